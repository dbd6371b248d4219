"""How fast does a VLMF-Net head train on a CPU, against the straightforward way and the floor?

On a synthetic cache of the paper's shape (5,799 pairs, 404 reports, 1024-d image and
4096-d report vectors), in one run, side by side:

1. the reference loop: a per-pair Dataset and DataLoader, nn.Linear layers, default AdamW,
   float32 (the same model, loss, schedule, batch size and validation each epoch);
2. `fuse`'s training (fuse.train.train_head): tensors in memory, fused AdamW, precision
   auto (bf16 autocast on a CPU with bf16 units, else float32); beside bf16 also float32,
   with each one's kept-epoch validation AUC, and a second seed's for the trial-to-trial
   noise;
3. this machine's floor for that training: model FLOPs over the faster matmul rate
   (bf16 where the CPU has bf16 units, else float32), plus the optimizer's bytes over the
   memory bandwidth, both measured here;
4. the whole protocol (`python -m fuse protocol`, M1-M4 and the baselines at their real
   widths, N trials, probes) on synthetic feature files, under torchrun with one process
   per core (`--processes`) as dvc.yaml runs it, with head and probe seconds from its
   runs.json. At 80 epochs it runs with its defaults (patience 20) and is timed as is;
   the output adds what every epoch would have cost;
5. the peak RSS of the protocol's largest process (and of the bench's own).

Seconds per 80-epoch training are measured on `--epochs` epochs and scaled to 80 (said in
the output). Writes bench/results/fuse_cpu.json. The first line names the CPU; the last
gives fuse's multiple of the floor and ends in `ratio: N` (reference / fuse).

    python bench/fuse_cpu.py                 # full
    python bench/fuse_cpu.py --epochs 8      # per-training times from 8 epochs, full protocol
    python bench/fuse_cpu.py --epochs 4 --protocol-epochs 4   # quicker, patience off
    python bench/fuse_cpu.py --smoke         # seconds, tiny shapes (run by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name, timed_precisions  # noqa: E402
from cache.store import FeatureSet, write_features  # noqa: E402
from fuse.losses import nt_xent  # noqa: E402
from fuse.model import FusionHead  # noqa: E402
from fuse.train import (  # noqa: E402
    HeadSettings,
    resolve_precision,
    train_head,
    warmup_cosine,
)
from pipeline.keys import pair_key, text_key  # noqa: E402

PAPER = {"pairs": 5799, "reports": 404, "image": 1024, "text": 4096}
SMOKE = {"pairs": 240, "reports": 24, "image": 32, "text": 48}
# Real widths of each protocol model's features (encoder, modality) -> width.
REAL_WIDTHS = {
    ("blip2-qformer", "image"): 1024,  # the paper's image vector
    ("llama3", "text"): 4096,
    ("blip2-vit", "image"): 1408,
    ("clip-image", "image"): 768,
    ("clip-text", "text"): 768,
    ("align-image", "image"): 640,
    ("align-text", "text"): 640,
    ("blip2-text", "text"): 256,
    ("vilt", "pair"): 768,
    ("chinese-clip-image", "image"): 512,
    ("chinese-clip-text", "text"): 512,
}
# Per-dimension shift between the classes: weak enough that the kept validation AUC is
# below 1, so bf16 and fp32 can be told apart by it.
SIGNAL = 0.05
RESULTS = Path(__file__).parent / "results" / "fuse_cpu.json"


def synthetic_rows(shape: dict[str, int], seed: int = 0):
    """Row-aligned image/text vectors with a weak label signal, report ids and a split."""
    rng = np.random.default_rng(seed)
    report_of_row = np.sort(rng.integers(0, shape["reports"], shape["pairs"]))
    report_label = rng.integers(0, 2, shape["reports"])
    labels = report_label[report_of_row]
    image = rng.normal(0, 1, (shape["pairs"], shape["image"])) + SIGNAL * labels[:, None]
    text = rng.normal(0, 1, (shape["reports"], shape["text"]))[report_of_row]
    text += SIGNAL * labels[:, None]
    order = rng.permutation(shape["reports"])
    split_of_report = np.where(
        order < 0.8 * shape["reports"], 0, np.where(order < 0.9 * shape["reports"], 1, 2)
    )
    splits = split_of_report[report_of_row]
    return (
        torch.tensor(image, dtype=torch.float32),
        torch.tensor(text, dtype=torch.float32),
        torch.tensor(labels),
        torch.tensor(report_of_row),
        torch.from_numpy(np.flatnonzero(splits == 0)),
        torch.from_numpy(np.flatnonzero(splits == 1)),
    )


class ReferenceHead(nn.Module):
    """VLMF-Net's head written the plain way, with nn.Linear: the same function as fuse's."""

    def __init__(self, image_width: int, text_width: int, settings: HeadSettings) -> None:
        super().__init__()
        self.image_projector = nn.Linear(image_width, settings.image_projection)
        self.text_projector = nn.Linear(text_width, settings.text_projection)
        layers, width = [], settings.image_projection + settings.text_projection
        for hidden in settings.hidden_widths:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(settings.dropout)]
            width = hidden
        self.classifier = nn.Sequential(*layers, nn.Linear(width, 2))
        self.image_contrastive = nn.Linear(settings.image_projection, settings.contrastive_width)
        self.text_contrastive = nn.Linear(settings.text_projection, settings.contrastive_width)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        image_z = F.normalize(self.image_projector(image), dim=-1)
        text_z = F.normalize(self.text_projector(text), dim=-1)
        logits = self.classifier(torch.cat([image_z, text_z], dim=-1))
        return logits, self.image_contrastive(image_z), self.text_contrastive(text_z)


class Pairs(Dataset):
    """One image-report pair per item, the way a first version reads a cache."""

    def __init__(self, image, text, labels, groups, rows) -> None:
        self.image, self.text, self.labels, self.groups, self.rows = (
            image,
            text,
            labels,
            groups,
            rows,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        return self.image[row], self.text[row], self.labels[row], self.groups[row]


def reference_training(data, settings: HeadSettings, seed: int) -> float:
    """The straightforward loop; returns seconds."""
    image, text, labels, groups, train, val = data
    torch.manual_seed(seed)
    model = ReferenceHead(image.shape[1], text.shape[1], settings)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    loader = DataLoader(
        Pairs(image, text, labels, groups, train), batch_size=settings.batch_size, shuffle=True
    )
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total, warmup = steps_per_epoch * settings.epochs, steps_per_epoch * settings.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total)
    )
    start = time.perf_counter()
    best_loss, best_state = math.inf, None
    for _ in range(settings.epochs):
        model.train()
        for batch_image, batch_text, batch_labels, batch_groups in loader:
            logits, image_embedding, text_embedding = model(batch_image, batch_text)
            loss = F.cross_entropy(logits, batch_labels) + settings.contrastive_weight * nt_xent(
                image_embedding, text_embedding, batch_groups, settings.temperature
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(model(image[val], text[val])[0], labels[val]).item()
        if val_loss < best_loss:
            best_loss = val_loss
            best_state = {name: value.clone() for name, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    return time.perf_counter() - start


def fuse_training(data, settings: HeadSettings, seed: int) -> tuple[float, float]:
    """fuse's own training of the same head; returns seconds and the kept epoch's val AUC."""
    image, text, labels, groups, train, val = data
    torch.manual_seed(seed)
    model = FusionHead(
        input_widths={"image0": image.shape[1], "text1": text.shape[1]},
        projections={"image0": settings.image_projection, "text1": settings.text_projection},
        hidden_widths=settings.hidden_widths,
        dropout=settings.dropout,
        num_classes=2,
        contrastive_width=settings.contrastive_width,
    )
    start = time.perf_counter()
    trained = train_head(model, [image, text], labels, groups, train, val, settings, seed)
    seconds = time.perf_counter() - start
    return seconds, trained.history[trained.best_epoch - 1]["val_auc"]


def _best_seconds(action, repeats: int = 5) -> float:
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def floor_seconds(shape: dict[str, int], settings: HeadSettings, train_rows: int) -> dict:
    """FLOPs over the faster measured matmul rate + optimizer bytes over measured bandwidth."""
    batch = settings.batch_size
    rates = {}
    for name in timed_precisions():
        a = torch.randn(batch, shape["text"], dtype=getattr(torch, name))
        w = torch.randn(shape["text"], settings.text_projection, dtype=getattr(torch, name))
        seconds = _best_seconds(lambda a=a, w=w: a @ w)
        rates[name] = 2 * batch * shape["text"] * settings.text_projection / seconds
    matmul_dtype = max(rates, key=rates.get)
    matmul_rate = rates[matmul_dtype]
    big = torch.randn(64_000_000)
    other = torch.randn(64_000_000)
    add_seconds = _best_seconds(lambda: big.add_(other))
    bandwidth = 3 * 4 * big.numel() / add_seconds  # read two, write one float32 stream

    projected = settings.image_projection + settings.text_projection
    first_layers = [
        (shape["image"], settings.image_projection),
        (shape["text"], settings.text_projection),
    ]
    inner_layers = [
        (settings.image_projection, settings.contrastive_width),
        (settings.text_projection, settings.contrastive_width),
    ]
    width = projected
    for hidden in (*settings.hidden_widths, 2):
        inner_layers.append((width, hidden))
        width = hidden
    # forward + weight gradient for every layer; input gradient only where inputs train.
    step_flops = sum(4 * batch * i * o for i, o in first_layers)
    step_flops += sum(6 * batch * i * o for i, o in inner_layers)
    parameters = sum(i * o + o for i, o in first_layers + inner_layers)
    steps = math.ceil(train_rows / batch) * settings.epochs
    optimizer_bytes = parameters * 4 * 7  # read param, grad, m, v; write param, m, v
    compute = steps * step_flops / matmul_rate
    memory = steps * optimizer_bytes / bandwidth
    return {
        "matmul_dtype": matmul_dtype,
        "matmul_gflops": matmul_rate / 1e9,
        "bandwidth_gbs": bandwidth / 1e9,
        "parameters": parameters,
        "step_gflop": step_flops / 1e9,
        "compute_seconds": compute,
        "optimizer_seconds": memory,
        "floor_seconds": compute + memory,
    }


def write_protocol_cache(folder: Path, shape: dict[str, int], widths: dict) -> tuple[Path, list]:
    """A manifest of the paper's shape and one feature file per protocol feature."""
    rng = np.random.default_rng(0)
    report_of_row = np.sort(rng.integers(0, shape["reports"], shape["pairs"]))
    labels = rng.integers(0, 2, shape["reports"])
    reports = [f"报告{index}：声带所见" for index in range(shape["reports"])]
    table = pd.DataFrame(
        {
            "image_path": [f"images/{row}.png" for row in range(shape["pairs"])],
            "report_text": [reports[r] for r in report_of_row],
            "label": [("VCD", "GC")[labels[r]] for r in report_of_row],
            "patient_id": [f"P{r}" for r in report_of_row],
        }
    )
    manifest = folder / "manifest.csv"
    table.to_csv(manifest, index=False)
    image_keys = {path: f"image-{row}" for row, path in enumerate(table["image_path"])}
    report_keys = [text_key(report) for report in reports]
    row_labels = np.array([labels[r] for r in report_of_row])
    paths = []
    for (encoder, modality), width in widths.items():
        if modality == "text":
            keys, vectors = (
                report_keys,
                rng.normal(0, 1, (len(reports), width)) + SIGNAL * labels[:, None],
            )
            sources = {}
        else:
            keys = list(image_keys.values())
            if modality == "pair":
                keys = [
                    pair_key(image_keys[p], text_key(t))
                    for p, t in zip(table["image_path"], table["report_text"], strict=True)
                ]
            vectors = rng.normal(0, 1, (len(keys), width)) + SIGNAL * row_labels[:, None]
            sources = image_keys
        path = folder / f"{encoder}-{modality}.h5"
        write_features(
            path,
            FeatureSet(
                keys=tuple(keys),
                vectors=vectors.astype(np.float32),
                provenance={"encoder": encoder, "modality": modality, "pooling": "mean"},
                sources=sources,
            ),
        )
        paths.append(str(path))
    return manifest, paths


def run_protocol_process(
    manifest: Path, paths: list[str], out: Path, epochs: int, trials: int, processes: int
) -> dict[str, float]:
    """`python -m fuse protocol` on the synthetic cache, as dvc.yaml runs it (under torchrun
    with `processes` processes), in processes of its own (so their peak RSS is their
    own); head and probe seconds come from its runs.json (summed over the processes)."""
    # At 80 epochs the protocol runs with its defaults, patience included, and is timed as
    # it is. At fewer, patience is off so that every head's time scales to 80 epochs.
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [
        *launcher, "-m", "fuse", "protocol", "--manifest", str(manifest),
        "--features", *paths, "--out", str(out), "--trials", str(trials),
        "--epochs", str(epochs), "--warmup-epochs", str(min(5, epochs - 1)),
        *(["--patience", "0"] if epochs < 80 else []),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    runs = json.loads((out / "runs.json").read_text(encoding="utf-8"))["runs"]
    heads = [run for run in runs if run["head"] == "head"]
    head_seconds = sum(run["seconds"] for run in heads)
    every_epoch_head_seconds = sum(run["seconds"] * 80 / run["epochs_trained"] for run in heads)
    return {
        "seconds": seconds,
        "processes": processes,
        "heads": len(heads),
        "probes": len(runs) - len(heads),
        "head_seconds": head_seconds,
        "probe_seconds": sum(run["seconds"] for run in runs if run["head"] == "probe"),
        "mean_epochs_trained": float(np.mean([run["epochs_trained"] for run in heads])),
        "seconds_80": seconds + head_seconds * (80 / epochs - 1),
        "seconds_80_every_epoch": seconds - head_seconds + every_epoch_head_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=80, help="epochs timed per training")
    parser.add_argument("--protocol-epochs", type=int, default=80, help="epochs per protocol head")
    parser.add_argument("--trials", type=int, default=5, help="protocol trials")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="protocol processes under torchrun (default: one per core, as dvc.yaml runs it)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 epochs, 1 trial")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else PAPER
    epochs = 2 if args.smoke else args.epochs
    protocol_epochs = 2 if args.smoke else args.protocol_epochs
    trials = 1 if args.smoke else args.trials
    widths = {key: (16 if args.smoke else width) for key, width in REAL_WIDTHS.items()}
    torch.set_num_threads(torch.get_num_threads())  # one process, every core, no oversubscription
    # Both loops train every epoch: the comparison is per 80-epoch training.
    settings = HeadSettings(
        epochs=epochs, warmup_epochs=min(5, epochs - 1), batch_size=64, patience=0
    )
    print(
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; shape {shape}, batch 64, "
        f"{epochs} epochs timed, scaled to 80"
    )
    # First, while this process is small: a child's ru_maxrss also counts the pages of the
    # process it was started from, so started later it would report this bench's peak.
    with tempfile.TemporaryDirectory() as folder:
        manifest, paths = write_protocol_cache(Path(folder), shape, widths)
        protocol = run_protocol_process(
            manifest, paths, Path(folder) / "out", protocol_epochs, trials, args.processes
        )
    measured = (
        f"{protocol['seconds'] / 60:.1f} min measured (heads {protocol['head_seconds']:.0f} s, "
        f"probes {protocol['probe_seconds']:.0f} s)"
    )
    if protocol_epochs < 80:
        at_80 = (
            f"{measured}, patience off; at 80 epochs about "
            f"{protocol['seconds_80'] / 60:.1f} min (head time scaled by 80/{protocol_epochs})"
        )
    else:
        at_80 = (
            f"{measured}, default patience: {protocol['mean_epochs_trained']:.0f} epochs per head "
            f"on average; every epoch trained, about "
            f"{protocol['seconds_80_every_epoch'] / 60:.1f} min (each head's time per epoch x 80)"
        )
    print(
        f"whole protocol ({protocol['heads']} heads + {protocol['probes']} probes: "
        f"{len(REAL_WIDTHS)} feature files at real widths, {trials} trials, up to "
        f"{protocol_epochs} epochs, {args.processes} process(es)): {at_80}; "
        f"its peak RSS {protocol['peak_rss_gb']:.2f} GB"
    )
    data = synthetic_rows(shape)
    scale = 80 / epochs

    reference = reference_training(data, settings, 0) * scale
    print(f"reference loop (per-pair DataLoader, AdamW, fp32): {reference:.1f} s / 80 epochs")
    precision = resolve_precision(settings).precision
    seconds, auc_default = fuse_training(data, settings, 0)
    ours = seconds * scale
    print(
        f"fuse (in memory, fused AdamW, precision auto = {precision} here): "
        f"{ours:.1f} s / 80 epochs"
    )
    auc = {precision: auc_default}
    seconds_80 = {precision: ours}
    if precision == "bf16":
        seconds, auc["fp32"] = fuse_training(
            data, dataclasses.replace(settings, precision="fp32"), 0
        )
        seconds_80["fp32"] = seconds * scale
        print(f"fuse with precision fp32 (for comparison): {seconds_80['fp32']:.1f} s / 80 epochs")
    else:
        print("fuse with precision bf16: not timed, this CPU has no bf16 units (emulated)")
    _, auc_seed1 = fuse_training(data, settings, 1)
    print(
        "kept epoch's validation AUC, seed 0: "
        + ", ".join(f"{name} {value:.4f}" for name, value in auc.items())
        + f"; {precision} seed 1 (trial noise) {auc_seed1:.4f}"
    )
    floor = floor_seconds(shape, dataclasses.replace(settings, epochs=80), len(data[4]))
    print(
        f"floor: {floor['step_gflop']:.2f} GFLOP/step at {floor['matmul_gflops']:.0f} GFLOP/s "
        f"({floor['matmul_dtype']} matmul) = {floor['compute_seconds']:.1f} s, + "
        f"{floor['parameters'] / 1e6:.1f}M "
        f"params x 28 B/step at {floor['bandwidth_gbs']:.1f} GB/s = "
        f"{floor['optimizer_seconds']:.1f} s; total {floor['floor_seconds']:.1f} s; "
        f"fuse is {ours / floor['floor_seconds']:.2f}x the floor"
    )

    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"peak RSS of this bench's own process (reference loop, floor arrays): {peak_rss_gb:.2f} GB"
    )
    result = {
        "machine": platform.node(),
        "threads": torch.get_num_threads(),
        "shape": shape,
        "epochs_timed": epochs,
        "reference_seconds_80": reference,
        "fuse_precision": precision,
        "fuse_seconds_80": ours,
        "fuse_seconds_80_by_precision": seconds_80,
        "kept_val_auc": {**auc, f"{precision}_seed1": auc_seed1},
        "cpu": cpu_name(),
        "floor": floor,
        "protocol": protocol,
        "protocol_epochs": protocol_epochs,
        "protocol_trials": trials,
        "bench_peak_rss_gb": peak_rss_gb,
        "ratio": reference / ours,
        "floor_multiple": ours / floor["floor_seconds"],
        "smoke": args.smoke,
    }
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"fuse is {ours / floor['floor_seconds']:.2f}x the floor; "
        f"reference / fuse seconds per 80-epoch training, ratio: {reference / ours:.1f}"
    )


if __name__ == "__main__":
    main()
