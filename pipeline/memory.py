"""Keeping the heap's freed blocks for the next batch or step, and giving them back after.

PyTorch's CPU tensors come from malloc. glibc serves every block above its mmap threshold
(128 KiB at first) with fresh pages from the kernel and unmaps them when freed, so a loop
that allocates and frees the same large tensors each iteration (activations of an encoder
batch, a head's gradients) pays a page fault and zero-fill for every page, every time. On
a 2-core machine, `python -m extract --num-workers 0` over the demo's images spent 77 of
its 179 CPU seconds in the kernel, and 6 with the blocks kept; a paper-shape head step
took 34 ms against 29 (bench/fuse_cpu.py). Elsewhere than glibc these do nothing.
"""

from __future__ import annotations

import ctypes
import functools

_MALLOPT_TRIM_THRESHOLD, _MALLOPT_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed blocks (up to 1 GiB each) for reuse instead of returning
    them to the system; processes forked afterwards (DataLoader workers) inherit it."""
    libc = _glibc()
    if libc:
        libc.mallopt(_MALLOPT_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_MALLOPT_TRIM_THRESHOLD, 1 << 30)


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): once a model
    is done with, the blocks reuse_freed_memory kept would otherwise stay resident, and a
    protocol of many heads and probes grows to several GB."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
