"""What the extraction benches measure besides FLOPs: a matmul ceiling, wall time with the
device drained, and the padding of length-batched texts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; a CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(action: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    action()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_second(
    rows: int, inner: int, outer: int, dtype: torch.dtype, device: torch.device
) -> float:
    """FLOP/s of one plain [rows, inner] x [inner, outer] product: the rate a model of these
    widths could reach on this device if nothing but its largest matmuls ran."""
    left = torch.randn(rows, inner, dtype=dtype, device=device)
    right = torch.randn(inner, outer, dtype=dtype, device=device)
    return 2 * rows * inner * outer / best_seconds(lambda: left @ right, device)


def length_batches(lengths: Sequence[int], batch_size: int, by_length: bool) -> list[list[int]]:
    """Indices of texts in batches of `batch_size`: in the given order, or longest first
    (so each batch holds texts of similar length)."""
    order = list(range(len(lengths)))
    if by_length:
        order.sort(key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the token slots that are padding when each batch is padded to its longest."""
    slots = sum(len(batch) * max(lengths[index] for index in batch) for batch in batches)
    return 1 - sum(lengths) / slots if slots else 0.0
