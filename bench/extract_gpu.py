"""How fast do the paper's full-size encoders run on a GPU, naive vs extract's way, and what
share of the device's peak do they use?

Builds the full-size architectures from configs in bench/configs with random weights (the
speed of a forward pass does not depend on the weights' values): BLIP-2 opt-2.7b's ViT-g +
Q-Former (blip2-opt-2.7b-image.json) and Llama-3-8B (llama-3-8b.json). Inputs are random
pixels (decoding is bench/extract_cpu.py's concern) and random token ids with lengths spread
around --report-tokens. For each encoder:

- naive: one forward per pair (batch 1), --naive-dtype (float32), every pair's report
  encoded again (no deduplication), timed on --naive-items items;
- ours: what `python -m extract` does: batches of --image-batch / --text-batch in --dtype
  (the Q-Former stays in float32, as BLIP-2 keeps it), reports sorted by length into
  batches, each unique report once.

It prints images/s, reports/s and the model FLOP utilisation (MFU): FLOPs counted from the
configs (bench/model_flops.py; padding not counted) per second, over the device's dense
bf16 peak from PEAK_TFLOPS (by device name; --peak-tflops overrides; an unknown device is
divided by a bf16 matmul measured in the run, and says so). Then seconds for the paper's
shape (5,799 pairs, 404 reports) both ways, and writes bench/results/extract_gpu.json.

    python bench/extract_gpu.py                          # on a GPU with >= 40 GB
    python bench/extract_gpu.py --naive-dtype bfloat16   # 24 GB: Llama-3-8B in float32
                                                         # alone needs 32 GB
    python bench/extract_gpu.py --smoke                  # CPU, tiny configs (the tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, LlamaModel, PretrainedConfig
from transformers.modeling_utils import PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_flops import (  # noqa: E402
    bench_config,
    blip2_image_flops,
    llama_flops,
    vit_tokens,
)
from bench.throughput import (  # noqa: E402
    length_batches,
    matmul_flops_per_second,
    padding_share,
    synchronise,
)
from extract.blip2 import Blip2ImageQFormer  # noqa: E402
from extract.encoders import DTYPES, place, pool  # noqa: E402
from extract.registry import get_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "extract_gpu.json"
PAPER = {"pairs": 5799, "reports": 404}
# Dense (no sparsity) bf16 tensor-core peaks with float32 accumulation, TFLOP/s, from NVIDIA's
# datasheets; matched against torch.cuda.get_device_name(), first match wins (so the longer
# names come first: "L40S" before "L40" before "L4").
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "RTX A6000": 154.8,  # the paper's GPUs
    "RTX 4090": 165.2,
    "L4": 121.0,
}


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    """(table key, TFLOP/s) of the first PEAK_TFLOPS entry in the device's name, if any."""
    return next(((key, tflops) for key, tflops in PEAK_TFLOPS.items() if key in device_name), None)


def peak_flops(device: torch.device, override_tflops: float) -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and where the figure comes from."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    known = datasheet_peak(name) if device.type == "cuda" else None
    if known:
        return known[1] * 1e12, f"datasheet dense bf16 peak of {known[0]}"
    side = 4096 if device.type == "cuda" else 1024  # large enough to saturate each
    measured = matmul_flops_per_second(side, side, side, torch.bfloat16, device)
    return measured, f"a {side}^3 bf16 matmul measured now on {name or device.type} (no datasheet)"


def build(
    model_class: type[PreTrainedModel], config: PretrainedConfig, dtype: torch.dtype, device
) -> PreTrainedModel:
    """Random weights, initialised on the device itself (an 8B model initialised on a CPU
    takes minutes), in `dtype`, with float32 kept where the architecture keeps it."""
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return place(model, device, dtype).eval()


def report_lengths(count: int, mean: int, max_length: int, seed: int = 0) -> list[int]:
    """Token counts of `count` reports, uniform within +-50% of `mean`."""
    rng = np.random.default_rng(seed)
    return [int(n) for n in rng.integers(mean // 2, mean * 3 // 2 + 1, count).clip(2, max_length)]


def token_batch(lengths: list[int], vocab: int, device) -> dict[str, torch.Tensor]:
    """Random ids right-padded to the longest, with the attention mask."""
    generator = torch.Generator().manual_seed(len(lengths))
    ids = torch.randint(2, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def image_forward(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda pixels: pool(model(pixels.to(model.vision_model.dtype)), "mean")


def text_forward(model: PreTrainedModel) -> Callable[[dict], torch.Tensor]:
    def forward(tokens: dict) -> torch.Tensor:
        hidden = model(**tokens, use_cache=False).last_hidden_state
        return pool(hidden, "mean", tokens["attention_mask"])

    return forward


def timed_items(forward: Callable, batches: list, device) -> float:
    """Seconds for one pass over `batches`, after a warm-up forward of the first."""
    with torch.inference_mode():
        forward(batches[0])
        synchronise(device)
        start = time.perf_counter()
        for batch in batches:
            forward(batch)
        synchronise(device)
    return time.perf_counter() - start


def measure_images(config, args, device, peak: float) -> dict:
    per_image = blip2_image_flops(config)
    side = config.vision_config.image_size
    pixels = torch.randn(args.images, 3, side, side, device=device)
    model = build(Blip2ImageQFormer, config, DTYPES[args.naive_dtype], device)
    naive_batches = [pixels[i : i + 1] for i in range(args.naive_items)]
    naive = args.naive_items / timed_items(image_forward(model), naive_batches, device)
    place(model, device, DTYPES[args.dtype])
    batches = list(pixels.split(args.image_batch))
    ours = args.images / timed_items(image_forward(model), batches, device)
    del model
    return {
        "gflop_per_item": per_image / 1e9,
        "naive_per_second": naive,
        "ours_per_second": ours,
        "naive_mfu": naive * per_image / peak,
        "ours_mfu": ours * per_image / peak,
    }


def measure_reports(config, args, device, peak: float) -> dict:
    lengths = report_lengths(args.reports, args.report_tokens, config.max_position_embeddings)
    model = build(LlamaModel, config, DTYPES[args.naive_dtype], device)
    forward = text_forward(model)
    naive_lengths = lengths[: args.naive_items]
    naive_batches = [token_batch([n], config.vocab_size, device) for n in naive_lengths]
    naive_seconds = timed_items(forward, naive_batches, device)
    place(model, device, DTYPES[args.dtype])
    plan = length_batches(lengths, args.text_batch, by_length=True)
    batches = [
        token_batch([lengths[i] for i in batch], config.vocab_size, device) for batch in plan
    ]
    ours_seconds = timed_items(forward, batches, device)
    del model
    naive_flops = sum(llama_flops(config, n) for n in naive_lengths)
    ours_flops = sum(llama_flops(config, n) for n in lengths)
    return {
        "mean_tokens": float(np.mean(lengths)),
        "gflop_per_item": ours_flops / len(lengths) / 1e9,
        "padding_share": padding_share(lengths, plan),
        "naive_per_second": len(naive_lengths) / naive_seconds,
        "ours_per_second": len(lengths) / ours_seconds,
        "naive_mfu": naive_flops / naive_seconds / peak,
        "ours_mfu": ours_flops / ours_seconds / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu with --smoke)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--naive-dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--images", type=int, default=512, help="images ours encodes")
    parser.add_argument("--reports", type=int, default=256, help="reports ours encodes")
    parser.add_argument("--report-tokens", type=int, default=200, help="mean tokens per report")
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--text-batch", type=int, default=16)
    parser.add_argument("--naive-items", type=int, default=32, help="items naive times, each")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the peak")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.images, args.reports, args.report_tokens = "cpu", 8, 8, 20
        args.image_batch, args.text_batch, args.naive_items = 4, 4, 2
        image_config = AutoConfig.for_model(**get_spec("blip2-qformer").tiny_config)
        text_config = AutoConfig.for_model(**get_spec("llama3").tiny_config)
    else:
        image_config = bench_config("blip2-opt-2.7b-image")
        text_config = bench_config("llama-3-8b")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU here: this bench needs one (--smoke runs it on the CPU, tiny)")
    peak, peak_source = peak_flops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({device_name}); "
        f"peak {peak / 1e12:.1f} TFLOP/s from {peak_source}; {args.dtype} ours, "
        f"{args.naive_dtype} naive; {'tiny' if args.smoke else 'full-size'} configs"
    )
    images = measure_images(image_config, args, device, peak)
    tokens = vit_tokens(image_config.vision_config)
    print(
        f"images: {images['gflop_per_item']:.4g} GFLOP each ({tokens} ViT tokens); naive "
        f"{images['naive_per_second']:.3g}/s (MFU {images['naive_mfu']:.2%}), "
        f"ours {images['ours_per_second']:.3g}/s in batches of {args.image_batch} "
        f"(MFU {images['ours_mfu']:.2%})"
    )
    reports = measure_reports(text_config, args, device, peak)
    print(
        f"reports: {reports['gflop_per_item']:.4g} GFLOP each ({reports['mean_tokens']:.0f} tokens "
        f"on average); naive {reports['naive_per_second']:.3g}/s (MFU {reports['naive_mfu']:.2%}), "
        f"ours {reports['ours_per_second']:.3g}/s in length-sorted batches of {args.text_batch} "
        f"(MFU {reports['ours_mfu']:.2%}, padding share {reports['padding_share']:.1%})"
    )
    naive = (
        PAPER["pairs"] / images["naive_per_second"] + PAPER["pairs"] / reports["naive_per_second"]
    )
    ours = (
        PAPER["pairs"] / images["ours_per_second"] + PAPER["reports"] / reports["ours_per_second"]
    )
    result = {
        "machine": platform.node(),
        "device": device_name,
        "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "dtype": args.dtype,
        "naive_dtype": args.naive_dtype,
        "images": images,
        "reports": reports,
        "paper_shape_seconds": {"naive": naive, "ours": ours},
        "ratio": naive / ours,
        "smoke": args.smoke,
    }
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"paper's shape ({PAPER['pairs']} pairs, {PAPER['reports']} reports): naive {naive:.0f} s, "
        f"ours {ours:.0f} s, ratio: {naive / ours:.1f}"
    )


if __name__ == "__main__":
    main()
