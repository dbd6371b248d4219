"""How fast does `python -m extract` encode a demo-shaped data set on a CPU, against a naive
loop and this machine's ceiling?

On the demo's shape (pipeline.demo: 404 reports, about 5,800 image-report pairs, internal
site only) with random-weight mid-size encoders of both architectures
(bench/configs/blip2-mid-image.json: BLIP-2 ViT + Q-Former; bench/configs/llama-mid.json:
LLaMA), saved with save_pretrained and added through a user registry file, in one run, side
by side:

1. the naive loop: for each pair, decode its image and encode it, then encode its report:
   one forward per item, float32, no deduplication, no DataLoader workers. Timed on
   --naive-pairs pairs spread over the manifest and scaled to all pairs (said in the
   output); its vectors are compared with extract's;
2. extract's code path (extract.run.run, what `python -m extract` runs): each unique image
   and report once, in batches, with workers, in the precision measured faster here
   (float32 and bfloat16 are both timed on a sample and printed; on a CPU without bf16
   units, where bfloat16 is emulated, only float32);
3. each encoder's achieved GFLOP/s (FLOPs from its config, bench/model_flops.py, times the
   items, over the seconds spent inside its forward) against a plain matmul of its MLP's shape
   measured in this run, in float32 and (with bf16 units) bfloat16: the faster one is this
   machine's ceiling;
4. the padding share of the text batches;
5. where one batch's forward spends its time, in the precision extract uses: matrix
   products, attention, normalisation, activations, copies, other operators and time
   outside any operator (bench/operations.py, from torch.profiler);
6. both encoders again at the real checkpoints' widths (BLIP-2 opt-2.7b's ViT-g and
   Q-Former, Llama-3-8B) with fewer layers (REAL_WIDTH_LAYERS), random weights saved and
   loaded the same way: one batch of each through the same encode(), its share of the
   ceiling at that shape, and where the time goes. At the mid-size widths the per-token
   element-wise work and attention weigh more against the matmuls than at the real ones.

The mid-size configs keep the real pair's balance: a report costs LLaMA about 3x what an
image costs the ViT (Llama-3-8B on a 75-token report vs ViT-g: about 2x), and the Q-Former,
which BLIP-2 keeps in float32, about 2% of an image's FLOPs (ViT-g's Q-Former: 2.4%). The last line
ends in `ratio: N` (naive seconds over extract's). Writes bench/results/extract_cpu.json
(not with --smoke).

    python bench/extract_cpu.py                                    # full, a few minutes
    python bench/extract_cpu.py --patients 100 --naive-pairs 40    # quicker
    python bench/extract_cpu.py --smoke       # seconds, tiny configs (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import AutoConfig, LlamaModel, PretrainedConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name, timed_precisions  # noqa: E402
from bench.model_flops import (  # noqa: E402
    bench_config,
    blip2_image_flops,
    llama_flops,
    vit_tokens,
)
from bench.operations import describe, profiled  # noqa: E402
from bench.throughput import (  # noqa: E402
    length_batches,
    matmul_flops_per_second,
    padding_share,
)
from cache.store import FeatureSet, read_features  # noqa: E402
from extract.blip2 import Blip2ImageQFormer  # noqa: E402
from extract.encoders import Encoder  # noqa: E402
from extract.loaders import ENCODER_CLASSES, load_encoder  # noqa: E402
from extract.preprocess import image_transform  # noqa: E402
from extract.registry import get_spec  # noqa: E402
from extract.run import ExtractConfig  # noqa: E402
from extract.run import run as run_extract  # noqa: E402
from pipeline.demo.generate import DemoConfig  # noqa: E402
from pipeline.demo.generate import run as run_demo  # noqa: E402
from pipeline.keys import file_key, normalise_text, text_key  # noqa: E402
from pipeline.memory import reuse_freed_memory  # noqa: E402

CPU = torch.device("cpu")
RESULTS = Path(__file__).parent / "results" / "extract_cpu.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMAGE, TEXT = "bench-image", "bench-text"  # the registry entries this bench writes
LOADER = {IMAGE: "blip2-qformer", TEXT: "decoder-text"}
# Layers kept of the real encoders (ViT-g 39, its Q-Former 12, Llama-3-8B 32) for the
# real-width part: 6 of the ViT's and 2 of the Q-Former's keep the Q-Former's share of an
# image's FLOPs near the real 2.4% (2.6%); the share of the ceiling is a per-layer rate.
REAL_WIDTH_LAYERS = {"vision": 6, "qformer": 2, "llama": 2}


def encoder_configs(smoke: bool) -> dict[str, PretrainedConfig]:
    """Mid-size configs from bench/configs, or the registry's tiny ones for --smoke."""
    if smoke:
        return {
            IMAGE: AutoConfig.for_model(**get_spec("blip2-qformer").tiny_config),
            TEXT: AutoConfig.for_model(**get_spec("llama3").tiny_config),
        }
    return {IMAGE: bench_config("blip2-mid-image"), TEXT: bench_config("llama-mid")}


def real_width_configs(smoke: bool) -> dict[str, PretrainedConfig]:
    """The real checkpoints' widths with fewer layers (REAL_WIDTH_LAYERS), or the tiny
    configs for --smoke. Llama-3-8B keeps the tiny tokenizer's vocabulary: its embedding is a
    lookup, no FLOPs, and the tokenizer's ids have to fit it."""
    if smoke:
        return encoder_configs(smoke)
    image, text = bench_config("blip2-opt-2.7b-image"), bench_config("llama-3-8b")
    image.vision_config.num_hidden_layers = REAL_WIDTH_LAYERS["vision"]
    image.qformer_config.num_hidden_layers = REAL_WIDTH_LAYERS["qformer"]
    text.num_hidden_layers = REAL_WIDTH_LAYERS["llama"]
    text.vocab_size = bench_config("llama-mid").vocab_size
    text.bos_token_id, text.eos_token_id = 0, 1
    return {IMAGE: image, TEXT: text}


def write_encoders(folder: Path, configs: dict[str, PretrainedConfig]) -> Path:
    """Save seeded random weights of both encoders and a registry file naming them; return
    the registry file (what a user with their own checkpoints writes)."""
    torch.manual_seed(0)
    Blip2ImageQFormer._from_config(configs[IMAGE]).save_pretrained(folder / IMAGE)
    LlamaModel._from_config(configs[TEXT]).save_pretrained(folder / TEXT)
    shutil.copytree(get_spec("llama3").tiny_tokenizer_folder, folder / TEXT, dirs_exist_ok=True)
    entries = {
        IMAGE: {
            "source": str(folder / IMAGE),
            "modality": "image",
            "loader": LOADER[IMAGE],
            "pooling": "mean",
            "preprocessing": dict(get_spec("blip2-qformer").preprocessing),
        },
        TEXT: {
            "source": str(folder / TEXT),
            "modality": "text",
            "loader": LOADER[TEXT],
            "pooling": "mean",
            "preprocessing": {"max_length": 512},
        },
    }
    registry = folder / "bench_encoders.yaml"
    registry.write_text(json.dumps(entries, indent=2), encoding="utf-8")  # JSON is YAML
    return registry


@contextmanager
def encode_seconds(name: str) -> Iterator[list[float]]:
    """Seconds spent inside forward() of the loader class `name` runs (the model's forward
    pass, which extract runs once per batch; pooling is negligible), while in the block."""
    encoder_class = ENCODER_CLASSES[LOADER[name]]
    original = encoder_class.forward
    seconds = [0.0]

    def timed(self: Encoder, batch):
        start = time.perf_counter()
        outputs = original(self, batch)
        seconds[0] += time.perf_counter() - start
        return outputs

    inherited = "forward" not in vars(encoder_class)
    encoder_class.forward = timed
    try:
        yield seconds
    finally:
        if inherited:
            del encoder_class.forward
        else:
            encoder_class.forward = original


def load(name: str, registry: Path, dtype: str) -> Encoder:
    return load_encoder(get_spec(name, registry), "hub", CPU, DTYPES[dtype])


def sample_batch(encoder: Encoder, table: pd.DataFrame, folder: Path, size: int):
    """`size` inputs of the encoder's modality from the manifest (images decoded); reports of
    similar length, the middle `size` of the unique reports sorted by length, as extract
    batches them."""
    if encoder.spec.modality == "text":
        reports = list(dict.fromkeys(normalise_text(text) for text in table["report_text"]))
        lengths = encoder.token_lengths(reports)
        by_length = sorted(range(len(reports)), key=lengths.__getitem__)
        start = max(0, (len(reports) - size) // 2)
        return [reports[index] for index in by_length[start : start + size]]
    transform = image_transform(encoder.preprocessing)
    images = []
    for path in table["image_path"][:size]:
        with Image.open(folder / path) as image:
            images.append(transform(image))
    return torch.stack(images)


def seconds_per_item(encoder: Encoder, batch) -> float:
    """Best of two timed encode() calls on one batch, after a warm-up, per item."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            encoder.encode(batch)
            times.append(time.perf_counter() - start)
    return min(times[1:]) / len(batch)


def mlp_widths(name: str, config: PretrainedConfig) -> tuple[int, int]:
    """The encoder's width and its MLP's: the shape of its largest matmuls."""
    if name == IMAGE:
        return config.vision_config.hidden_size, config.vision_config.intermediate_size
    return config.hidden_size, config.intermediate_size


def rate_against_ceiling(
    name: str, config: PretrainedConfig, flops: float, seconds: float, tokens_per_batch: int
) -> dict:
    """Achieved FLOP/s against a plain matmul of the encoder's MLP shape at its batch's
    tokens, timed here in each precision; the faster one is this machine's ceiling."""
    inner, outer = mlp_widths(name, config)
    ceiling = {
        dtype: matmul_flops_per_second(tokens_per_batch, inner, outer, DTYPES[dtype], CPU)
        for dtype in timed_precisions()
    }
    best = max(ceiling, key=ceiling.get)
    return {
        "achieved": flops / seconds / 1e9,
        **{f"matmul_{dtype}": value / 1e9 for dtype, value in ceiling.items()},
        "share_of_ceiling": flops / seconds / ceiling[best],
        "ceiling_matmul": f"{best} [{tokens_per_batch}x{inner}]x[{inner}x{outer}]",
    }


def describe_rate(rate: dict) -> str:
    """'N GFLOP/s = S% of the ceiling, a plain ... matmul: ...'."""
    return (
        f"{rate['achieved']:.4g} GFLOP/s = {rate['share_of_ceiling']:.0%} of the ceiling, a "
        f"plain {rate['ceiling_matmul']} matmul: "
        + ", ".join(
            f"{value:.4g} GFLOP/s {key.removeprefix('matmul_')}"
            for key, value in rate.items()
            if key.startswith("matmul_")
        )
    )


def batch_flops(name: str, config: PretrainedConfig, encoder: Encoder, batch) -> tuple[float, int]:
    """Model FLOPs of one batch from the config (text: each report's own tokens, padding not
    counted) and the tokens the batch's matmuls run on."""
    if name == IMAGE:
        return blip2_image_flops(config) * len(batch), len(batch) * vit_tokens(config.vision_config)
    lengths = [min(length, encoder.max_length) for length in encoder.token_lengths(batch)]
    return sum(llama_flops(config, length) for length in lengths), max(lengths) * len(batch)


def layers(name: str, config: PretrainedConfig) -> str:
    """The encoder's layers: '6 + 2' (ViT + Q-Former) or '2'."""
    if name == IMAGE:
        return (
            f"{config.vision_config.num_hidden_layers} + {config.qformer_config.num_hidden_layers}"
        )
    return str(config.num_hidden_layers)


def real_width_rates(
    folder: Path,
    configs: dict[str, PretrainedConfig],
    table: pd.DataFrame,
    images: Path,
    dtype_of: dict[str, str],
    batch_size: int,
    label: str,
) -> dict[str, dict]:
    """Both encoders at the real checkpoints' widths (fewer layers), one batch each, in the
    precision extract uses: each one's share of the ceiling at its own shape, and where the
    rest goes."""
    registry = write_encoders(folder, configs)
    rates = {}
    for name in (IMAGE, TEXT):
        encoder = load(name, registry, dtype_of[name])
        batch = sample_batch(encoder, table, images, batch_size)
        seconds = seconds_per_item(encoder, batch) * len(batch)
        flops, tokens = batch_flops(name, configs[name], encoder, batch)
        rates[name] = rate_against_ceiling(name, configs[name], flops, seconds, tokens)
        _, rates[name]["forward_time_by_kind"] = profiled(encoder.encode, batch)
        widths = "x".join(str(width) for width in mlp_widths(name, configs[name]))
        print(
            f"{name} at {label} widths {widths}, {layers(name, configs[name])} layers, one "
            f"batch of {len(batch)} in {dtype_of[name]}: {seconds * 1e3:.0f} ms, "
            f"{describe_rate(rates[name])}; where it goes: "
            f"{describe(rates[name]['forward_time_by_kind'])}"
        )
        del encoder  # before the next one loads: Llama-3-8B's width takes GBs
    return rates


def naive_loop(
    encoders: dict[str, Encoder], table: pd.DataFrame, folder: Path, rows: np.ndarray
) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
    """One forward per pair and per item, image decoded per pair; seconds and vectors."""
    transform = image_transform(encoders[IMAGE].preprocessing)
    seconds = {IMAGE: 0.0, TEXT: 0.0}
    vectors: dict[str, list[np.ndarray]] = {IMAGE: [], TEXT: []}
    with torch.inference_mode():
        for row in rows:
            start = time.perf_counter()
            with Image.open(folder / table["image_path"][row]) as image:
                pixels = transform(image).unsqueeze(0)
            vectors[IMAGE].append(encoders[IMAGE].encode(pixels)[0].numpy())
            middle = time.perf_counter()
            report = normalise_text(table["report_text"][row])
            vectors[TEXT].append(encoders[TEXT].encode([report])[0].numpy())
            seconds[IMAGE] += middle - start
            seconds[TEXT] += time.perf_counter() - middle
    return seconds, vectors


def min_cosine(naive: list[np.ndarray], features: FeatureSet, keys: list[str]) -> float:
    """The lowest cosine between the naive loop's vectors and extract's for the same items."""
    ours = features.vectors[features.rows_of(keys, "extract's feature file")]
    naive_array = np.stack(naive)
    cosine = (ours * naive_array).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(naive_array, axis=1)
    )
    return float(cosine.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=404, help="demo patients (reports)")
    parser.add_argument("--images-per-report", type=int, default=14, help="demo images/report")
    parser.add_argument("--naive-pairs", type=int, default=60, help="pairs the naive loop times")
    parser.add_argument("--batch-size", type=int, default=32, help="extract's --batch-size")
    parser.add_argument("--num-workers", type=int, default=1, help="extract's --num-workers")
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: the faster one here"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configs and data, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.patients, args.images_per_report, args.naive_pairs = 6, 3, 4
        args.batch_size, args.num_workers = 4, 0
    configs = encoder_configs(args.smoke)
    threads = torch.get_num_threads()
    # As python -m extract does (extract.run): without it every batch's large activations
    # come from fresh pages, and the sample timings and profiles would count page faults
    # that extract does not pay.
    reuse_freed_memory()
    print(
        f"CPU: {cpu_name()}, {threads} threads; torch "
        f"{torch.__version__}; {'tiny' if args.smoke else 'mid-size'} random-weight encoders"
    )

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        manifest = run_demo(
            DemoConfig(
                out=str(folder / "demo"),
                patients=args.patients,
                external_patients=0,
                images_per_report=args.images_per_report,
            )
        )
        table = pd.read_csv(manifest)
        reports = list(dict.fromkeys(normalise_text(text) for text in table["report_text"]))
        print(
            f"demo: {len(table)} pairs, {table['image_path'].nunique()} images, "
            f"{len(reports)} reports"
        )
        registry = write_encoders(folder, configs)

        # Precision: each candidate timed on one batch of each encoder; the faster one runs
        # extract. Without bf16 units bf16 is emulated (hundreds of times slower than float32:
        # a batch would take minutes), so only float32 is a candidate there.
        candidates = [args.dtype] if args.dtype != "auto" else list(timed_precisions())
        fp32 = {name: load(name, registry, "float32") for name in (IMAGE, TEXT)}
        dtype_of, per_item, time_split = {}, {}, {}
        for name in (IMAGE, TEXT):
            batch = sample_batch(fp32[name], table, manifest.parent, args.batch_size)
            encoders = {
                dtype: fp32[name] if dtype == "float32" else load(name, registry, dtype)
                for dtype in candidates
            }
            per_item[name] = {
                dtype: seconds_per_item(encoder, batch) for dtype, encoder in encoders.items()
            }
            dtype_of[name] = min(per_item[name], key=per_item[name].get)
            print(
                f"{name} on a batch of {len(batch)}: "
                + ", ".join(f"{dtype} {t * 1e3:.1f} ms/item" for dtype, t in per_item[name].items())
                + f" -> extract uses {dtype_of[name]}"
                + ("" if "bfloat16" in candidates else " (bfloat16 not timed: emulated here)")
            )
            seconds, time_split[name] = profiled(encoders[dtype_of[name]].encode, batch)
            print(
                f"{name} in {dtype_of[name]}, where one batch's {seconds * 1e3:.0f} ms go "
                f"(torch.profiler, operators' own time): {describe(time_split[name])}"
            )

        rows = np.linspace(0, len(table) - 1, min(args.naive_pairs, len(table))).astype(int)
        naive_seconds, naive_vectors = naive_loop(fp32, table, manifest.parent, rows)
        scale = len(table) / len(rows)
        naive = {name: seconds * scale for name, seconds in naive_seconds.items()}
        naive_total = sum(naive.values())
        print(
            f"naive loop (per pair: decode, 1 image + 1 report forward, float32, no dedup, "
            f"no workers): {naive_total:.1f} s for {len(table)} pairs (image {naive[IMAGE]:.1f} "
            f"s, text {naive[TEXT]:.1f} s), timed on {len(rows)} pairs and scaled x{scale:.1f}"
        )

        ours, encode, outputs = {}, {}, {}
        for name in (IMAGE, TEXT):
            outputs[name] = folder / f"{name}.h5"
            config = ExtractConfig(
                model=name,
                registry=str(registry),
                weights="hub",
                manifest=str(manifest),
                out=str(outputs[name]),
                device="cpu",
                dtype=dtype_of[name],
                batch_size=args.batch_size,
                num_workers=args.num_workers,
            )
            with encode_seconds(name) as inside:
                start = time.perf_counter()
                run_extract(config)
                ours[name] = time.perf_counter() - start
            encode[name] = inside[0]
        ours_total = sum(ours.values())
        print(
            f"extract (unique items, batches of {args.batch_size}, {args.num_workers} "
            f"worker(s), {dtype_of[IMAGE]} image / {dtype_of[TEXT]} text): {ours_total:.1f} s "
            f"(image {ours[IMAGE]:.1f} s, text {ours[TEXT]:.1f} s; inside forward "
            f"{encode[IMAGE]:.1f} s and {encode[TEXT]:.1f} s)"
        )
        features = {name: read_features(path) for name, path in outputs.items()}
        agreement = {
            IMAGE: min_cosine(
                naive_vectors[IMAGE],
                features[IMAGE],
                [file_key(manifest.parent / table["image_path"][row]) for row in rows],
            ),
            TEXT: min_cosine(
                naive_vectors[TEXT],
                features[TEXT],
                [text_key(table["report_text"][row]) for row in rows],
            ),
        }
        print(
            f"same vectors: lowest cosine naive vs extract over the timed pairs: image "
            f"{agreement[IMAGE]:.4f}, text {agreement[TEXT]:.4f}"
        )
        real_configs = real_width_configs(args.smoke)
        real_rates = real_width_rates(
            folder / "real-width",
            real_configs,
            table,
            manifest.parent,
            dtype_of,
            args.batch_size,
            "tiny (--smoke)" if args.smoke else "the real checkpoints'",
        )

    max_length = fp32[TEXT].max_length
    lengths = [min(length, max_length) for length in fp32[TEXT].token_lengths(reports)]
    padding = {
        order: padding_share(lengths, length_batches(lengths, args.batch_size, order == "sorted"))
        for order in ("manifest", "sorted")
    }
    # python -m extract records the share of its own batch plan (lengths sorted) in the run
    # record; it is also computed here for both orders, from the token lengths.
    recorded = features[TEXT].provenance.get("run", {}).get("padding_share")
    print(
        "padding share of the text batches: "
        + (f"{recorded:.1%} (extract's run record); " if recorded is not None else "")
        + f"computed here for batches of {args.batch_size}: {padding['manifest']:.1%} in "
        f"manifest order, {padding['sorted']:.1%} sorted by length"
    )

    flops = {
        IMAGE: blip2_image_flops(configs[IMAGE]) * len(features[IMAGE].keys),
        TEXT: sum(llama_flops(configs[TEXT], length) for length in lengths),
    }
    tokens_per_batch = {
        IMAGE: args.batch_size * vit_tokens(configs[IMAGE].vision_config),
        TEXT: args.batch_size * int(np.mean(lengths)),
    }
    rates = {
        name: rate_against_ceiling(
            name, configs[name], flops[name], encode[name], tokens_per_batch[name]
        )
        for name in (IMAGE, TEXT)
    }
    for name, rate in rates.items():
        print(
            f"{name} in {dtype_of[name]} achieved {describe_rate(rate)} ({flops[name] / 1e12:.3g} "
            f"TFLOP from its config / {encode[name]:.1f} s in forward)"
        )

    result = {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "threads": threads,
        "pairs": len(table),
        "images": len(features[IMAGE].keys),
        "reports": len(reports),
        "configs": {name: config.to_dict() for name, config in configs.items()},
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "dtype": dtype_of,
        "sample_seconds_per_item": per_item,
        "naive_pairs_timed": len(rows),
        "naive_seconds": naive,
        "extract_seconds": ours,
        "extract_encode_seconds": encode,
        "lowest_cosine_naive_vs_extract": agreement,
        "padding_share": {**padding, "recorded": recorded},
        "forward_time_by_kind": time_split,
        "gflops": rates,
        "real_width": {
            "layers": REAL_WIDTH_LAYERS,
            "configs": {name: config.to_dict() for name, config in real_configs.items()},
            "gflops": real_rates,
        },
        "ratio": naive_total / ours_total,
        "smoke": args.smoke,
    }
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"naive / extract seconds for {len(table)} pairs, ratio: {naive_total / ours_total:.1f}")


if __name__ == "__main__":
    main()
