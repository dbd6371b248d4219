"""Losing no finished work, per output: what an existing feature file and the parts of an
interrupted run already hold, the batches left to encode, and the file written at the end.

All of it runs on the main process. The existing output is read once (read_existing) and
that one reading serves the refusal to replace another encoder's file, the reuse of its
vectors and the consolidation; the plan made here is passed on, not read back.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.store import FeatureSet, check_finite, features_bytes, read_features
from extract.batching import padding_share, plan_batches
from extract.encoders import Encoder
from extract.items import UniqueItems
from extract.parts import Batch, Parts
from extract.provenance import encoder_identity
from extract.registry import EncoderSpec
from pipeline.atomic import partial_path, write_atomically
from pipeline.errors import UserError


@dataclass(frozen=True)
class OutputPlan:
    """What the main process found on disk and decided for one output, for every process
    to follow."""

    identity: str  # the main process's encoder identity, which names the parts
    up_to_date: bool
    from_file: int  # items whose vectors the existing output already holds
    from_parts: int  # items whose batches an interrupted run finished
    batches: list[Batch]  # the whole plan, as recorded in the parts folder
    pending: list[Batch]  # batches still to encode
    padding_share: float | None  # of the pending batches, for reports
    padding_share_unsorted: float | None  # the same batches cut in manifest order
    long_reports: list[str]  # names of the pending reports over the encoder's max_length


def read_existing(out: Path) -> FeatureSet | None:
    """The complete feature file at `out`, if there is one that can be read (a damaged or
    foreign one is nothing worth keeping: it is said, and replaced)."""
    if not out.is_file():
        return None
    try:
        return read_features(out)
    except UserError as problem:
        print(f"warning: not reusing {out}: {problem}", file=sys.stderr)
        return None


def refuse_to_replace(
    out: Path, spec: EncoderSpec, items: UniqueItems, existing: FeatureSet | None
) -> None:
    """Refuse to replace a complete feature file of another encoder, modality or data: a
    typo in --model or --out would throw away a finished extraction (on a GPU, hours).

    Raises:
        UserError: naming what the file holds and --overwrite.
    """
    if existing is None:
        return
    held = existing.provenance
    differences = [
        f"{name} {held.get(name)!r} (this run: {wanted!r})"
        for name, wanted in (("encoder", spec.name), ("modality", spec.modality))
        if held.get(name) != wanted
    ]
    if existing.keys and not set(existing.keys) & set(items.keys):
        differences.append("vectors of other data (no item in common with this manifest)")
    if differences:
        raise UserError(
            f"--out {out} is a complete feature file of {'; '.join(differences)}; pass "
            "--overwrite true to replace it, or choose another --out"
        )


def reusable(existing: FeatureSet | None, identity: str) -> FeatureSet | None:
    """The existing output, if its vectors have this run's encoder identity."""
    if existing is not None and encoder_identity(existing.provenance) == identity:
        return existing
    return None


def _token_lengths(encoder: Encoder, keys: Sequence[str], texts: Sequence[str]) -> dict[str, int]:
    """Tokens per report before truncation."""
    # Nothing may be left to encode (every item held by the file); tokenizers fail on [].
    lengths = encoder.token_lengths(texts) if texts else []
    return dict(zip(keys, lengths, strict=True))


def plan_output(
    out: Path,
    identity: str,
    manifest_sha256: str,
    items: UniqueItems,
    encoder: Encoder,
    batch_size: int,
    existing: FeatureSet | None,
) -> OutputPlan:
    """Decide what to encode for one output, and record the plan in its parts folder.

    Args:
        existing: read_existing(out), already reusable() for `identity` (or None).
    """
    parts = Parts(out, identity)
    held = set(existing.keys if existing else ()) & set(items.keys)
    if (
        existing is not None
        and list(existing.keys) == items.keys
        and dict(existing.sources) == items.sources
        and dict(existing.skipped) == items.skipped
        and existing.provenance.get("manifest", {}).get("sha256") == manifest_sha256
    ):
        # Left by a run of another encoder identity, or killed while writing this file.
        parts.remove()
        partial_path(out).unlink(missing_ok=True)
        return OutputPlan(identity, True, len(held), 0, [], [], None, None, [])
    todo = [key for key in items.keys if key not in held]
    lengths = None
    over: set[str] = set()
    if encoder.spec.modality == "text":
        text_of_key = dict(zip(items.keys, items.inputs, strict=True))
        tokens = _token_lengths(encoder, todo, [text_of_key[key] for key in todo])
        over = {key for key, length in tokens.items() if length > encoder.max_length}
        # a report's padded batch row holds at most max_length tokens
        lengths = {key: min(length, encoder.max_length) for key, length in tokens.items()}
    batches = plan_batches(todo, batch_size, parts.planned_batches(), lengths)
    parts.start(batches)
    pending = [batch for batch in batches if not parts.done(batch)]
    padding = unsorted = None
    if lengths is not None:
        pending_set = {key for batch in pending for key in batch}
        pending_keys = [key for key in todo if key in pending_set]
        padding = padding_share(pending, lengths)
        unsorted = padding_share(plan_batches(pending_keys, batch_size), lengths)
    from_parts = len(todo) - sum(len(batch) for batch in pending)
    pending_over = {key for batch in pending for key in batch} & over
    names = [name for key, name in zip(items.keys, items.names, strict=True) if key in pending_over]
    return OutputPlan(
        identity, False, len(held), from_parts, batches, pending, padding, unsorted, names
    )


def consolidate(
    out: Path,
    provenance: dict[str, Any],
    items: UniqueItems,
    width: int,
    plan: OutputPlan,
    existing: FeatureSet | None,
) -> FeatureSet:
    """The reused and the new vectors, in the order of first appearance, into the output
    file; then the parts go.

    Args:
        existing: the reusable existing output the plan was made with (or None).

    Raises:
        UserError: vectors holding NaN or inf, or a full disk (the parts are kept).
    """
    parts = Parts(out, plan.identity)
    row_of_key = {key: row for row, key in enumerate(items.keys)}
    vectors = np.full((len(items.keys), width), np.nan, np.float32)
    if plan.from_file and existing is not None:
        kept = [key for key in existing.keys if key in row_of_key]
        vectors[[row_of_key[key] for key in kept]] = existing.vectors[
            existing.rows_of(kept, str(out))
        ]
    for batch in plan.batches:
        vectors[[row_of_key[key] for key in batch]] = parts.read(batch)
    check_finite(items.names, vectors, f"vectors for {out}")
    features = FeatureSet(
        keys=tuple(items.keys),
        vectors=vectors,
        provenance=provenance,
        sources=items.sources,
        skipped=items.skipped,
    )
    content = features_bytes(features)
    write_atomically(
        out,
        lambda temporary: temporary.write_bytes(content),
        hook_point="consolidate",
        kept=", finished batches are kept",
    )
    parts.remove()
    return features
