"""HDF5 feature files: one encoder's vectors, keyed by content, with their provenance.

Layout of format version 1:

    /                  attrs: format, format_version, complete
    /features          attrs: provenance (JSON)
    /features/keys     (N,) UTF-8 content keys, one per row; row order is stored, not implied
    /features/vectors  (N, width) the encoder's output, one row per key
    /sources/name      (M,) optional: where each item came from (an image path) ...
    /sources/key       (M,) ... and its key, so training needs no access to the images
    /skipped/name      (S,) optional: items extraction left out (an image path as in the
                       manifest; for a report its key, a space and its first 40 characters) ...
    /skipped/reason    (S,) ... and why (e.g. "zero-byte", "truncated or undecodable")

`skipped` came after the first files of version 1; readers treat its absence as "nothing
skipped", so the version stays 1. A file is written as NAME.partial in the same folder,
fsynced and renamed last (pipeline.atomic), so a crash never leaves a file that looks complete
but is not. Writing is deterministic (no timestamps), so equal content gives equal bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache.hdf5 import hdf5_bytes, write_hdf5_atomically
from pipeline.errors import UserError

FORMAT_NAME = "vlmf-features"
FORMAT_VERSION = 1
_TEXT = h5py.string_dtype(encoding="utf-8")


@dataclass(frozen=True)
class FeatureSet:
    """Vectors of unique items, their content keys and how they were made."""

    keys: tuple[str, ...]  # content keys (pipeline.keys), one per row of `vectors`
    vectors: np.ndarray  # [N, width]
    provenance: Mapping[str, Any]  # JSON-serialisable: encoder, source, pooling, dtype, ...
    sources: Mapping[str, str] = field(default_factory=dict)  # source name -> key
    skipped: Mapping[str, str] = field(default_factory=dict)  # item name -> why it was left out

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.keys):
            raise ValueError(
                f"vectors must be [len(keys), width]; got {self.vectors.shape} "
                f"for {len(self.keys)} keys"
            )
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("keys must be unique: each item is stored once")

    @property
    def width(self) -> int:
        """The length of one vector."""
        return int(self.vectors.shape[1])

    def rows_of(self, keys: list[str], what: str) -> np.ndarray:
        """Row indices of `keys`; a key that is absent is a UserError naming `what`."""
        row_of_key = {key: row for row, key in enumerate(self.keys)}
        absent = [key for key in keys if key not in row_of_key]
        if absent:
            raise UserError(
                f"{what}: {len(absent)} item(s) have no vector (first key {absent[0][:16]}...); "
                "the feature file was extracted from another manifest: re-run extraction"
            )
        return np.fromiter((row_of_key[key] for key in keys), dtype=np.int64, count=len(keys))


def check_finite(names: Sequence[str], vectors: np.ndarray, where: str) -> None:
    """Refuse vectors holding NaN or inf: they would poison every model trained on them.

    Args:
        names: one name per row of `vectors`, for the message (keys, or image paths).
        where: what the vectors belong to (a file, an encoder), for the message.

    Raises:
        UserError: naming how many rows are not finite and the first few of them.
    """
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        first = ", ".join(str(names[row]) for row in bad[:3])
        raise UserError(
            f"{where}: {bad.size} vector(s) hold NaN or inf (first: {first}); the encoder "
            "overflowed (try --dtype float32) or its weights are broken"
        )


def _write_texts(group: h5py.Group, name: str, texts: Sequence[str]) -> None:
    group.create_dataset(name, data=list(texts), dtype=_TEXT, track_times=False)


def fill_features(handle: h5py.File, features: FeatureSet) -> None:
    """Write `features` into an open, empty HDF5 file, marking it complete last."""
    handle.attrs["format"] = FORMAT_NAME
    handle.attrs["format_version"] = FORMAT_VERSION
    handle.attrs["complete"] = False
    group = handle.create_group("features")
    group.attrs["provenance"] = json.dumps(dict(features.provenance), ensure_ascii=False)
    _write_texts(group, "keys", features.keys)
    group.create_dataset("vectors", data=features.vectors, track_times=False)
    for group_name, column, table in (
        ("sources", "key", features.sources),
        ("skipped", "reason", features.skipped),
    ):
        if table:
            columns = handle.create_group(group_name)
            _write_texts(columns, "name", list(table))
            _write_texts(columns, column, list(table.values()))
    handle.attrs["complete"] = True


def features_bytes(features: FeatureSet) -> memoryview:
    """The bytes of the feature file holding `features` (what write_features writes), for a
    writer that puts them on disk itself (extraction, which marks its own moments)."""
    return hdf5_bytes(lambda handle: fill_features(handle, features))


def write_features(path: str | Path, features: FeatureSet) -> Path:
    """Write `features` to `path` atomically (via a .partial file, marked complete last).

    Raises:
        UserError: the disk is full or the write fails otherwise; `path` is unchanged.
    """
    return write_hdf5_atomically(Path(path), lambda handle: fill_features(handle, features))


_RERUN = "re-run extraction (python -m extract with the same --out) to write it again"


def _open_checked(path: Path) -> h5py.File:
    if path.is_dir():
        raise UserError(f"feature file {path} is a folder; give the .h5 files in it")
    if not path.is_file():
        raise UserError(f"feature file {path} does not exist; run extraction first")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{path} is not a readable HDF5 feature file ({reason}): if it is one, it is "
            f"damaged (cut short?); {_RERUN}"
        ) from None
    found_format = handle.attrs.get("format")
    version = int(handle.attrs.get("format_version", -1))
    problem = None
    if found_format != FORMAT_NAME:
        problem = f"{path} is not a {FORMAT_NAME} file (format attribute: {found_format!r})"
    elif version > FORMAT_VERSION:
        problem = (
            f"{path} is format version {version}, newer than this version of the tool "
            f"reads ({FORMAT_VERSION}); upgrade the package: pip install -U -e ."
        )
    elif version < FORMAT_VERSION:
        problem = (
            f"{path} is format version {version}; this tool reads version {FORMAT_VERSION}. "
            "Re-run extraction to rewrite it"
        )
    elif not bool(handle.attrs.get("complete", False)):
        problem = f"{path} was not completely written; re-run extraction"
    if problem:
        handle.close()
        raise UserError(problem)
    return handle


def _texts(dataset: h5py.Dataset) -> tuple[str, ...]:
    return tuple(dataset.asstr()[()])


def _require(handle: h5py.File, path: Path, *datasets: str) -> None:
    absent = [name for name in datasets if name not in handle]
    if absent:
        raise UserError(
            f"{path} lacks dataset(s) {', '.join(absent)}: the file is damaged; {_RERUN}"
        )


def _damaged(path: Path, error: Exception) -> UserError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UserError(f"{path} is damaged ({reason}); {_RERUN}")


def read_provenance(path: str | Path) -> dict[str, Any]:
    """Only the provenance of a feature file (cheap: no vectors are read)."""
    path = Path(path)
    with _open_checked(path) as handle:
        _require(handle, path, "features")
        try:
            return json.loads(handle["features"].attrs["provenance"])
        except (OSError, KeyError, ValueError) as error:
            raise _damaged(path, error) from None


def _table(handle: h5py.File, group: str, value: str) -> dict[str, str]:
    if group not in handle:
        return {}
    names = _texts(handle[f"{group}/name"])
    return dict(zip(names, _texts(handle[f"{group}/{value}"]), strict=True))


def read_features(path: str | Path) -> FeatureSet:
    """Read a whole feature file, checking its format, version, completeness and content.

    Raises:
        UserError: a missing, foreign, newer, incomplete or damaged file (absent datasets,
            keys and vectors of different lengths) or vectors holding NaN or inf.
    """
    path = Path(path)
    with _open_checked(path) as handle:
        _require(handle, path, "features/keys", "features/vectors")
        group = handle["features"]
        try:  # HDF5 reads lazily: a file cut short fails here, not when it opens
            keys, vectors = _texts(group["keys"]), group["vectors"][()]
            features = FeatureSet(
                keys=keys,
                vectors=vectors,
                provenance=json.loads(group.attrs["provenance"]),
                sources=_table(handle, "sources", "key"),
                skipped=_table(handle, "skipped", "reason"),
            )
        except (OSError, KeyError, ValueError) as error:
            raise _damaged(path, error) from None
    check_finite(keys, vectors, str(path))
    return features


def check_provenance(
    path: str | Path, provenance: Mapping[str, Any], expected: Mapping[str, Any]
) -> None:
    """Refuse features whose provenance differs from what a run asks for.

    Args:
        path: the file the provenance came from, for the message.
        provenance: the file's provenance.
        expected: provenance entries the run needs, e.g. {"encoder": "llama3", "pooling": "mean"}.

    Raises:
        UserError: listing every entry that differs, with both values.
    """
    differences = [
        f"{name} is {provenance.get(name)!r} in the file but this run asks for {wanted!r}"
        for name, wanted in expected.items()
        if provenance.get(name) != wanted
    ]
    if differences:
        raise UserError(
            f"{path} does not match this run: {'; '.join(differences)}. "
            "Point the run at matching features or change its settings"
        )
