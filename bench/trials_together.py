"""Would training a model's trials together, as one stacked network, make a demo head cheaper?

The demo's protocol is mostly M4-like heads on 64-d tiny features, each on one core (one
protocol process per core). On those shapes (batch 64; projectors 64 -> 512 and 64 -> 2048,
L2-normalisation, MLP 2560 -> 512 -> 128 -> 2 with dropout 0.3, contrastive projections to
256), in one run, side by side, milliseconds per training step of one trial:

1. fuse's own training (fuse.train.train_head on a FusionHead: modality dropout, NT-Xent
   with same-report masking, validation and selection each epoch);
2. the same layers written as plain PyTorch for one trial (functional ops, autocast bf16
   where this CPU has bf16 units, fused AdamW; the contrastive loss simplified to image ->
   report cross-entropy over the batch): what eager PyTorch needs for this network;
3. the same plain network for T trials at once, each weight stacked [T, in, out] and every
   product a batched one, per trial: if it beats 2, running a model's trials together pays.

Writes bench/results/trials_together.json; the first line names the CPU.

    python bench/trials_together.py          # full (about a minute)
    python bench/trials_together.py --smoke  # seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fuse_cpu import PAPER, fuse_training, synthetic_rows  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from fuse.train import HeadSettings, autocast, resolve_precision  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "trials_together.json"
DEMO_WIDTH = 64  # the demo's tiny encoders' vector width


def _layer_widths(settings: HeadSettings) -> list[tuple[int, int]]:
    """(inputs, outputs) of each layer of fuse's head at these settings: the image and text
    projectors, the MLP to two classes, then the two contrastive projections."""
    projected = settings.image_projection + settings.text_projection
    mlp = [projected, *settings.hidden_widths, 2]
    return [
        (DEMO_WIDTH, settings.image_projection),
        (DEMO_WIDTH, settings.text_projection),
        *pairwise(mlp),
        (settings.image_projection, settings.contrastive_width),
        (settings.text_projection, settings.contrastive_width),
    ]


def fuse_step_ms(settings: HeadSettings) -> float:
    """fuse's train_head at the demo's shapes: milliseconds per step, validation included."""
    data = synthetic_rows({**PAPER, "image": DEMO_WIDTH, "text": DEMO_WIDTH})
    fuse_training(data, settings, seed=0)  # warm-up, as the plain loops have
    seconds, _ = fuse_training(data, settings, seed=0)
    train = data[4]
    return seconds / (settings.epochs * -(-len(train) // settings.batch_size)) * 1000


def _stacked_parameters(trials: int, settings: HeadSettings) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    parameters = []
    for inputs, outputs in _layer_widths(settings):
        weight = torch.randn(trials, inputs, outputs, generator=generator) * inputs**-0.5
        parameters += [weight.requires_grad_(), torch.zeros(trials, 1, outputs).requires_grad_()]
    return parameters


def _plain_step(
    parameters: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    settings: HeadSettings,
) -> None:
    image, text, labels = batch
    trials, rows = labels.shape
    hidden_layers = len(settings.hidden_widths)
    weights, biases = parameters[0::2], parameters[1::2]

    def dense(index: int, inputs: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(biases[index], inputs, weights[index])

    with autocast(settings.precision):
        image_vector = F.normalize(dense(0, image), dim=-1)
        text_vector = F.normalize(dense(1, text), dim=-1)
        hidden = torch.cat([image_vector, text_vector], dim=-1)
        for layer in range(2, 2 + hidden_layers):
            hidden = F.dropout(F.relu(dense(layer, hidden)), settings.dropout)
        logits = dense(2 + hidden_layers, hidden)
        image_embedding = F.normalize(dense(3 + hidden_layers, image_vector), dim=-1)
        text_embedding = F.normalize(dense(4 + hidden_layers, text_vector), dim=-1)
        similarity = image_embedding @ text_embedding.transpose(1, 2) / settings.temperature
        matches = torch.arange(rows).expand(trials, rows)
        # summed over trials, so each trial's gradients are those of its own mean loss
        loss = trials * (
            F.cross_entropy(logits.float().reshape(-1, 2), labels.reshape(-1))
            + settings.contrastive_weight
            * F.cross_entropy(similarity.float().reshape(-1, rows), matches.reshape(-1))
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def plain_step_ms(trials: int, steps: int, settings: HeadSettings) -> float:
    """The plain stacked network for `trials` trials: milliseconds per step of one trial."""
    parameters = _stacked_parameters(trials, settings)
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=True
    )
    generator = torch.Generator().manual_seed(1)
    shape = (trials, settings.batch_size)
    batch = (
        torch.randn(*shape, DEMO_WIDTH, generator=generator),
        torch.randn(*shape, DEMO_WIDTH, generator=generator),
        torch.randint(0, 2, shape, generator=generator),
    )
    for _ in range(max(steps // 10, 2)):  # warm-up
        _plain_step(parameters, optimizer, batch, settings)
    start = time.perf_counter()
    for _ in range(steps):
        _plain_step(parameters, optimizer, batch, settings)
    return (time.perf_counter() - start) / steps / trials * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials stacked together")
    parser.add_argument("--smoke", action="store_true", help="a few steps, writes nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each protocol process runs
    epochs, steps = (2, 5) if args.smoke else (8, 300)
    settings = resolve_precision(HeadSettings(epochs=epochs, patience=0))
    precision = settings.precision
    print(f"cpu: {cpu_name()}, 1 thread, precision {precision}")
    fuse_ms = fuse_step_ms(settings)
    print(f"fuse train_head: {fuse_ms:.2f} ms per step ({epochs} epochs of the demo's shapes)")
    alone_ms = plain_step_ms(1, steps, settings)
    print(f"plain PyTorch, 1 trial: {alone_ms:.2f} ms per step")
    together_ms = plain_step_ms(args.trials, steps, settings)
    print(
        f"plain PyTorch, {args.trials} trials stacked: {together_ms:.2f} ms per step of one trial"
    )
    verdict = "pays" if together_ms < alone_ms else "does not pay"
    print(f"training the trials together {verdict}: {together_ms / alone_ms:.2f}x one trial's step")
    if not args.smoke:
        result = {
            "cpu": cpu_name(),
            "precision": precision,
            "fuse_ms_per_step": fuse_ms,
            "plain_ms_per_step": alone_ms,
            "stacked_trials": args.trials,
            "stacked_ms_per_trial_step": together_ms,
        }
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
