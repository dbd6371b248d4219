"""Where a forward pass's time goes: the profiler's per-operator times, in a few kinds.

An encoder at a fraction of the matmul ceiling spends the rest somewhere: in attention
kernels, which run far below the matmul rate on a CPU, in normalisations, activations and
other element-wise passes over the activations, in copies (casts and gathers too), or
outside any operator (Python, dispatch). bench/extract_cpu.py prints this split for each
encoder.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = (
    "matrix products",
    "attention",
    "normalisation",
    "activations",
    "copies",
    "other operators",
    "outside operators",
)
_MATRIX_PRODUCTS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::_convolution",
}
_NORMALISATION = {"aten::native_layer_norm", "aten::_fused_rms_norm"}
_ACTIVATIONS = {
    "aten::gelu",
    "aten::silu",
    "aten::relu",
    "aten::tanh",
    "aten::sigmoid",
}
_COPIES = {
    "aten::copy_",
    "aten::_to_copy",
    "aten::clone",
    "aten::cat",
    "aten::index_select",
    "aten::embedding",
    "aten::index",
}


def operation_kind(name: str) -> str:
    """The kind of operator a profiler event's name is: any of KINDS but the last."""
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    for kind, names in (
        ("matrix products", _MATRIX_PRODUCTS),
        ("normalisation", _NORMALISATION),
        ("activations", _ACTIVATIONS),
        ("copies", _COPIES),
    ):
        if name in names:
            return kind
    return "other operators"


def time_by_kind(call: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """Profile one `call`: its wall seconds, and the share of them each kind of operator
    took (its operators' own time, children excluded), with "outside operators" the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        call()
        wall_us = (time.perf_counter() - start) * 1e6
    events = [event for event in profiler.events() if event.name.startswith("aten::")]
    microseconds = dict.fromkeys(KINDS, 0.0)
    for event in events:
        microseconds[operation_kind(event.name)] += event.self_cpu_time_total
    microseconds["outside operators"] = max(0.0, wall_us - sum(microseconds.values()))
    return wall_us / 1e6, {kind: value / wall_us for kind, value in microseconds.items()}


def describe(shares: dict[str, float]) -> str:
    """'matrix products 41%, attention 27%, ...', largest first, kinds under 0.5% left out."""
    ordered = sorted(shares.items(), key=lambda item: -item[1])
    return ", ".join(f"{kind} {share:.0%}" for kind, share in ordered if share >= 0.005)


def profiled(encode: Callable[[object], object], batch: object) -> tuple[float, dict]:
    """time_by_kind of encode(batch) under inference mode, after one unprofiled call."""
    with torch.inference_mode():
        encode(batch)
        return time_by_kind(lambda: encode(batch))
