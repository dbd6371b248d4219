"""The extraction benches: FLOPs counted from configs, and both benches run in --smoke mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, Blip2Config, LlamaModel

from bench.extract_cpu import IMAGE, TEXT, real_width_configs
from bench.extract_gpu import datasheet_peak, peak_flops
from bench.model_flops import bench_config, blip2_image_flops, llama_flops, vit_flops
from bench.operations import KINDS, describe, profiled
from bench.throughput import length_batches, padding_share
from extract.blip2 import Blip2ImageQFormer
from pipeline.hardware import cpu_bf16_is_fast

REPO = Path(__file__).parents[1]
# Two patches of 14 px and the class token: 5 ViT tokens of width 48; 4 queries of width 32.
TINY_BLIP2 = AutoConfig.for_model(
    model_type="blip-2",
    num_query_tokens=4,
    vision_config={
        "image_size": 28,
        "patch_size": 14,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
    qformer_config={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "cross_attention_frequency": 2,
    },
)
TINY_LLAMA = AutoConfig.for_model(
    model_type="llama",
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_blip2_flops_match_a_hand_count():
    patch_embedding = 2 * 4 * (3 * 14 * 14) * 48
    vit_layer = 2 * 5 * 48 * (3 * 48) + 4 * 5 * 5 * 48 + 2 * 5 * 48 * 48 + 2 * 2 * 5 * 48 * 96
    query_self = 2 * 4 * 32 * (3 * 32) + 4 * 4 * 4 * 32 + 2 * 4 * 32 * 32
    query_mlp = 2 * 2 * 4 * 32 * 64
    # Layer 0 only (0 % 2 == 0): queries read the 5 ViT tokens of width 48.
    cross = 2 * 4 * 32 * 32 + 2 * 2 * 5 * 48 * 32 + 4 * 4 * 5 * 32 + 2 * 4 * 32 * 32
    expected = patch_embedding + vit_layer + 2 * (query_self + query_mlp) + cross
    assert expected == 599_744
    assert blip2_image_flops(TINY_BLIP2) == expected


def test_llama_flops_match_a_hand_count():
    # 7 tokens; head size 4, so K and V are 2 x 4 = 8 wide.
    layer = (
        2 * 7 * 16 * 16  # Q
        + 2 * 2 * 7 * 16 * 8  # K, V
        + 4 * 7 * 7 * 16  # QK^T and AV
        + 2 * 7 * 16 * 16  # O
        + 3 * 2 * 7 * 16 * 24  # gate, up, down
    )
    assert llama_flops(TINY_LLAMA, 7) == 2 * layer == 60_032


def _counted(model: torch.nn.Module, **inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def test_flop_counts_equal_torch_flop_counter_on_the_real_modules():
    # Eager attention: its matmuls are visible to the counter (CPU SDPA kernels are not).
    blip2 = Blip2ImageQFormer._from_config(TINY_BLIP2, attn_implementation="eager").eval()
    assert _counted(blip2, pixel_values=torch.zeros(1, 3, 28, 28)) == blip2_image_flops(TINY_BLIP2)
    llama = LlamaModel._from_config(TINY_LLAMA, attn_implementation="eager").eval()
    ids = torch.zeros(1, 7, dtype=torch.long)
    assert _counted(llama, input_ids=ids) == llama_flops(TINY_LLAMA, 7)


def test_full_size_configs_are_blip2_opt_2_7b_and_llama_3_8b():
    # transformers' default BLIP-2 vision and Q-Former configs are blip2-opt-2.7b's.
    shipped, default = bench_config("blip2-opt-2.7b-image"), Blip2Config()
    for part in ("vision_config", "qformer_config"):
        assert getattr(shipped, part).to_dict() == getattr(default, part).to_dict(), part
    # The figures FACTS.md gives: ~534 GFLOP per image, ~2.8 TFLOP per 200-token report.
    assert blip2_image_flops(shipped) / 1e9 == pytest.approx(534, rel=0.01)
    assert llama_flops(bench_config("llama-3-8b"), 200) / 1e12 == pytest.approx(2.8, rel=0.01)


def test_real_width_configs_keep_the_checkpoints_widths_and_the_qformers_share():
    configs = real_width_configs(smoke=False)
    image, full_image = configs[IMAGE], bench_config("blip2-opt-2.7b-image")
    for part in ("vision_config", "qformer_config"):
        cut, full = getattr(image, part).to_dict(), getattr(full_image, part).to_dict()
        assert {**cut, "num_hidden_layers": None} == {**full, "num_hidden_layers": None}
    assert image.vision_config.num_hidden_layers < full_image.vision_config.num_hidden_layers
    # The Q-Former's share of an image's FLOPs stays near ViT-g + Q-Former's own.
    share = 1 - vit_flops(image.vision_config) / blip2_image_flops(image)
    full_share = 1 - vit_flops(full_image.vision_config) / blip2_image_flops(full_image)
    assert share == pytest.approx(full_share, abs=0.005)
    text, full_text = configs[TEXT], bench_config("llama-3-8b")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(text, key) == getattr(full_text, key), key
    assert text.num_hidden_layers < full_text.num_hidden_layers


def test_padding_share_of_length_batches():
    lengths = [10, 2, 9, 3]
    in_order = length_batches(lengths, 2, by_length=False)
    assert in_order == [[0, 1], [2, 3]]
    assert padding_share(lengths, in_order) == pytest.approx(1 - 24 / 38)
    assert length_batches(lengths, 2, by_length=True) == [[0, 2], [3, 1]]
    assert padding_share(lengths, [[0, 2], [3, 1]]) == pytest.approx(1 - 24 / 26)


def test_a_forward_is_split_into_its_operators_kinds():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256))
    query = torch.randn(4, 2, 16, 32)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        attended = torch.nn.functional.scaled_dot_product_attention(query, query, query)
        return layer(inputs) + attended.sum()

    seconds, shares = profiled(forward, torch.randn(512, 64))
    assert seconds > 0
    assert set(shares) == set(KINDS)
    for kind in ("matrix products", "attention", "normalisation", "activations"):
        assert shares[kind] > 0, kind
    assert sum(shares.values()) == pytest.approx(1, abs=0.01)
    assert describe({"attention": 0.25, "matrix products": 0.7, "activations": 0.001}) == (
        "matrix products 70%, attention 25%"
    )


def _smoke(script: str, results: Path) -> list[str]:
    before = results.stat().st_mtime_ns if results.exists() else None
    completed = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke"], cwd=REPO, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    after = results.stat().st_mtime_ns if results.exists() else None
    assert after == before, f"--smoke wrote {results}"
    return completed.stdout.strip().splitlines()


def test_extract_cpu_bench_smoke_prints_timings_padding_gflops_and_ratio():
    lines = _smoke("extract_cpu.py", REPO / "bench" / "results" / "extract_cpu.json")
    assert any(re.match(r"naive loop .*: [\d.]+ s for \d+ pairs", line) for line in lines)
    assert any(re.match(r"extract \(.*\): [\d.]+ s", line) for line in lines)
    # bfloat16 is a candidate only where the CPU has bf16 units; emulated, it is far slower.
    bf16 = r"bfloat16 [\d.]+ ms/item" if cpu_bf16_is_fast() else r"bfloat16 not timed: emulated"
    assert any(
        re.match(rf"bench-image on a batch .*float32 [\d.]+ ms/item.*{bf16}", line)
        for line in lines
    )
    assert any(line.startswith("padding share of the text batches: ") for line in lines)
    # extract computes what the naive loop does (bfloat16 would cost a little agreement).
    (agreement,) = [line for line in lines if line.startswith("same vectors: ")]
    cosines = [float(value) for value in re.findall(r"(?:image|text) ([\d.]+)", agreement)]
    assert len(cosines) == 2 and min(cosines) > 0.98
    for encoder in ("bench-image", "bench-text"):
        assert any(
            re.match(rf"{encoder} in \w+ achieved [\d.e+-]+ GFLOP/s .* of the ceiling", line)
            for line in lines
        )
        (split,) = [line for line in lines if line.startswith(f"{encoder} in ") and " go " in line]
        assert "matrix products" in split and "attention" in split, split
        # The same measured at the real checkpoints' widths (tiny ones under --smoke).
        (real,) = [line for line in lines if line.startswith(f"{encoder} at tiny (--smoke) ")]
        assert re.search(r"widths \d+x\d+, [\d +]+ layers, one batch of \d+ in \w+: ", real)
        assert re.search(r"[\d.]+ GFLOP/s = \d+% of the ceiling, a plain \w+ \[\d+x", real)
        assert "where it goes: " in real and "matrix products" in real, real
    assert re.search(r"ratio: \d+(\.\d+)?$", lines[-1])


def test_extract_gpu_bench_smoke_prints_rates_mfu_peak_and_ratio():
    lines = _smoke("extract_gpu.py", REPO / "bench" / "results" / "extract_gpu.json")
    assert re.search(r"peak [\d.]+ TFLOP/s from ", lines[0])
    assert any(re.match(r"images: .* naive [\d.e+-]+/s \(MFU .*ours", line) for line in lines)
    assert any(re.match(r"reports: .* padding share [\d.]+%", line) for line in lines)
    assert re.search(r"ratio: \d+(\.\d+)?$", lines[-1])


@pytest.mark.parametrize(
    ("device_name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA RTX A6000", 154.8),
        ("NVIDIA GeForce RTX 4090", 165.2),
    ],
)
def test_gpu_peak_is_the_datasheet_figure_of_the_device(device_name: str, tflops: float):
    assert datasheet_peak(device_name)[1] == tflops


def test_unknown_device_and_override_peaks():
    assert datasheet_peak("NVIDIA Tesla T4") is None
    assert peak_flops(torch.device("cpu"), 100.0) == (1e14, "--peak-tflops")
