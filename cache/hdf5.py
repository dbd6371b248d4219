"""HDF5 files written whole or not at all, even on a full disk.

h5py writes lazily and flushes when a file is closed, also from an object's destructor;
when that flush meets a full disk, HDF5 reports the error where nobody can catch it and
the process can die with a segmentation fault. So the file is built in memory, and only
its finished bytes touch the disk, through pipeline.atomic, where a failed write is an
ordinary OSError and becomes one line. The price is one copy of the file in memory, no
more than the vectors it holds.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import h5py

from pipeline.atomic import write_atomically


def hdf5_bytes(fill: Callable[[h5py.File], None]) -> memoryview:
    """The bytes of an HDF5 file built in memory by `fill(handle)`."""
    image = io.BytesIO()
    with h5py.File(image, "w") as handle:
        fill(handle)
    return image.getbuffer()


def write_hdf5_atomically(path: Path, fill: Callable[[h5py.File], None], *, kept: str = "") -> Path:
    """Build an HDF5 file with `fill(handle)` in memory, then write it to `path` atomically.

    Args:
        path: the final file.
        fill: writes every attribute and dataset into the open file it is given.
        kept: as for pipeline.atomic.write_atomically.

    Raises:
        UserError: the disk is full or the write fails otherwise; `path` is unchanged.
    """
    content = hdf5_bytes(fill)
    return write_atomically(path, lambda temporary: temporary.write_bytes(content), kept=kept)
