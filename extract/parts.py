"""Finished batches on disk: the part files an interrupted extraction resumes from.

Beside the output FILE.h5, the folder FILE.h5.parts holds `plan.json` (the encoder
identity and the batches, as lists of item keys, that the run encodes) and one HDF5 part
per finished batch, named by a hash of the identity and the batch's keys: a part is
never taken for another encoder, pooling, dtype or batch. Each part is written
atomically (pipeline.atomic), so a part that exists is complete; a run that is killed loses
at most the batches it was encoding. Parts are removed once the output is written.

The fault hook's points `plan-write` and `part-write` (pipeline.fault_hook) are here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from cache.hdf5 import hdf5_bytes
from pipeline.atomic import write_atomically

PARTS_SUFFIX = ".parts"
PLAN_FILE = "plan.json"
_TEXT = h5py.string_dtype(encoding="utf-8")

Batch = tuple[str, ...]  # the keys of one batch's items, in encoding order


class Parts:
    """The parts folder of one output file, for one encoder identity."""

    def __init__(self, target: Path, identity: str) -> None:
        self.folder = target.with_name(target.name + PARTS_SUFFIX)
        self.identity = identity  # a hash of everything that makes vectors differ

    def path(self, batch: Batch) -> Path:
        """Where the part of `batch` is (or will be)."""
        digest = hashlib.sha256("\n".join((self.identity, *batch)).encode()).hexdigest()
        return self.folder / f"{digest[:32]}.h5"

    def planned_batches(self) -> list[Batch]:
        """The batches an earlier run of this identity planned; none if there is no plan or
        it was made for another encoder identity."""
        try:
            plan = json.loads((self.folder / PLAN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if plan.get("identity") != self.identity:
            return []
        return [tuple(batch) for batch in plan["batches"]]

    def start(self, batches: Sequence[Batch]) -> None:
        """Record the plan and delete everything else: parts of other identities or batches,
        unreadable parts and temporary files of killed writes (main process only)."""
        text = json.dumps({"identity": self.identity, "batches": [list(b) for b in batches]})
        write_atomically(  # creates the folder, or fails as one UserError line
            self.folder / PLAN_FILE,
            lambda temporary: temporary.write_text(text, encoding="utf-8"),
            hook_point="plan-write",
        )
        wanted = {self.path(batch): batch for batch in batches}
        for path in self.folder.iterdir():
            if path.name != PLAN_FILE and not (path in wanted and self._holds(path, wanted[path])):
                path.unlink()

    @staticmethod
    def _holds(path: Path, batch: Batch) -> bool:
        try:
            with h5py.File(path, "r") as handle:
                return tuple(handle["keys"].asstr()[()]) == batch
        except (OSError, KeyError):
            return False

    def done(self, batch: Batch) -> bool:
        """Whether `batch` is finished (written atomically: a part that exists is whole)."""
        return self.path(batch).is_file()

    def write(self, batch: Batch, vectors: np.ndarray) -> None:
        """Save the vectors of one finished batch.

        Raises:
            UserError: the disk is full or another write error (cache.hdf5).
        """

        def fill(handle: h5py.File) -> None:
            handle.create_dataset("keys", data=list(batch), dtype=_TEXT, track_times=False)
            handle.create_dataset("vectors", data=vectors, track_times=False)

        content = hdf5_bytes(fill)
        write_atomically(
            self.path(batch),
            lambda temporary: temporary.write_bytes(content),
            hook_point="part-write",
            kept=", finished batches are kept",
        )

    def read(self, batch: Batch) -> np.ndarray:
        """The vectors of a finished batch, one row per key."""
        with h5py.File(self.path(batch), "r") as handle:
            return handle["vectors"][()]

    def remove(self) -> None:
        """Delete the folder (after the output file holds every vector)."""
        shutil.rmtree(self.folder, ignore_errors=True)
