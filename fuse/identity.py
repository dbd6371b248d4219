"""Whether cached vectors belong to this manifest's data, and to this run.

Images. A feature file's sources table maps each image path it encoded to the content key
of the file it read then. Where this manifest's images are reachable (inside the image
root), each is hashed and compared with that key; any difference is an error naming the
rows. An image that is not reachable (fuse on a laptop) has its vector trusted by path when
  - this manifest is byte-identical to the one the file was extracted from (the sha256 in
    the provenance), or
  - that manifest is still readable at its recorded path (relative to the working folder,
    as extraction was run) with its recorded sha256, and the row's image path stands
    there with the same patient and report. A re-split, a subset or a superset of the same
    data passes; the same path under another patient or report is other data, an error
    naming the rows.
Otherwise the rows are used, matched by path only, and a note says how many could not be
verified and how to verify them. Reports (and image-report pairs) are keyed by their text,
so another report simply has no vector.

Weights. Tiny (random, for tests) and real weights (the hub cache or a folder) never mix in
one run; files of one source (e.g. blip2-qformer and blip2-vit, both from
Salesforce/blip2-opt-2.7b) must come from the same real checkpoint (equal fingerprints),
or M3 against M4 would compare checkpoints, not architectures; and a run may require a
weights kind and a dtype of every file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import UserError
from pipeline.keys import file_key, text_key
from pipeline.manifest import LINE_COLUMN, first_lines, image_file, read_table

WEIGHT_EXPECTATIONS = ("", "tiny", "real")  # "": any


def image_keys_here(
    table: pd.DataFrame, manifest_path: str | Path, image_root: str | Path | None = None
) -> dict[str, str | None]:
    """Content key of each of the manifest's images that is reachable; None where not.

    Args:
        image_root: where images may be read from; None: the manifest's folder.
    """
    return {
        image: _content_key(manifest_path, image, image_root)
        for image in table["image_path"].unique()
    }


def check_image_identity(
    table: pd.DataFrame,
    manifest_path: str | Path,
    sources: Mapping[str, str],
    provenance: Mapping[str, Any],
    feature_path: str,
    keys_here: Mapping[str, str | None],
) -> str | None:
    """Refuse a file whose image vectors were read from other images (rules above).

    Args:
        table: the validated manifest, index 0..N-1.
        manifest_path: its file; image paths start from its folder.
        sources: the feature file's image path -> content key table.
        provenance: the feature file's provenance (its "manifest" entry is used).
        feature_path: the feature file, for messages.
        keys_here: `image_keys_here` of the manifest.

    Returns:
        None, or a note saying how many rows could be matched by path only.

    Raises:
        UserError: rows whose image content, or whose patient or report at the same
            path, differs from what was extracted; the message counts and names them.
    """
    encoded = table["image_path"].isin(list(sources))
    here = table["image_path"].map(keys_here)
    reachable = encoded & here.notna()
    changed = reachable & (here != table["image_path"].map(sources))
    if changed.any():
        raise UserError(
            f"{feature_path} holds vectors of other images: {int(changed.sum())} of this "
            f"manifest's images have other content than when extracted, at line(s) "
            f"{_lines_and_paths(table, changed)}; re-run extraction on these images"
        )
    unverified = encoded & ~reachable
    recorded = provenance.get("manifest") or {}
    if not unverified.any() or recorded.get("sha256") == file_key(manifest_path):
        return None
    extracted_rows = _recorded_rows(recorded)
    if extracted_rows is None:
        extracted_from = (
            f"differs from the one it was extracted from, {recorded['path']}, which is not "
            "here unchanged"
            if recorded.get("path")
            else "is not recorded in it"
        )
        return (
            f"{feature_path}: {int(unverified.sum())} row(s) matched to their image vectors "
            f"by path only: the images are not here and this manifest {extracted_from}; "
            "make the images reachable to check their content"
        )
    rows = zip(table["image_path"], _row_identity(table), strict=True)
    other = unverified & ~pd.Series([row in extracted_rows for row in rows], index=table.index)
    if other.any():
        raise UserError(
            f"{feature_path} was extracted from {recorded['path']}, where {int(other.sum())} "
            f"of this manifest's image paths belong to another patient or report, at "
            f"line(s) {_lines_and_paths(table, other)}: they are likely other images. "
            "Re-run extraction, or make the images reachable so their content is checked"
        )
    return None


def _content_key(
    manifest_path: str | Path, image: str, image_root: str | Path | None
) -> str | None:
    try:
        location = image_file(manifest_path, image, image_root)
    except UserError:  # outside the image root: not to be read
        return None
    try:
        return file_key(location) if location.is_file() else None
    except OSError:  # unreadable (no permission): not reachable, so checked by path
        return None


def _row_identity(table: pd.DataFrame) -> pd.Series:
    # Split, label and site may change between manifests of the same data; these may not.
    return table["patient_id"] + "\x1f" + table["report_text"].map(text_key)


def _recorded_rows(recorded: Mapping[str, Any]) -> set[tuple[str, str]] | None:
    """(image path, row identity) of the manifest a file was extracted from, if still here."""
    path = Path(str(recorded.get("path", "")))
    if not recorded.get("path") or not path.is_file() or file_key(path) != recorded.get("sha256"):
        return None
    extracted = read_table(path)
    return set(zip(extracted["image_path"], _row_identity(extracted), strict=True))


def _lines_and_paths(table: pd.DataFrame, mask: pd.Series) -> str:
    first = table.loc[mask, "image_path"].iloc[0]
    return f"{first_lines(mask, table[LINE_COLUMN])} (first: {first})"


def weights_kind(provenance: Mapping[str, Any]) -> str:
    """ "tiny", "hub" or "folder" as recorded at extraction; "" if not recorded."""
    weights = str(provenance.get("weights") or "")
    return weights if weights in ("", "tiny", "hub") else "folder"


def check_weights(
    provenance_of: Mapping[str, Mapping[str, Any]],
    expect_weights: str = "",
    expect_dtype: str = "",
) -> None:
    """Refuse feature files whose weights or dtype disagree with each other or the run.

    Args:
        provenance_of: feature file -> its provenance.
        expect_weights: "" (any), "tiny" or "real" (hub or folder): every file's kind.
        expect_dtype: "" (any) or the dtype every file was extracted in (e.g. float16).

    Raises:
        UserError: listing every file that differs and what it records.
    """
    if expect_weights not in WEIGHT_EXPECTATIONS:
        raise UserError(f"expected weights {expect_weights!r}: use one of {WEIGHT_EXPECTATIONS}")
    kinds = {path: weights_kind(provenance) for path, provenance in provenance_of.items()}
    described = {
        path: f"{path} ({provenance.get('encoder')}): {kinds[path] or 'not recorded'}"
        + (f" {provenance['weights']}" if kinds[path] == "folder" else "")
        for path, provenance in provenance_of.items()
    }
    if "tiny" in kinds.values() and {"hub", "folder"} & set(kinds.values()):
        raise UserError(
            "feature files mix tiny (random, for tests) and real weights: "
            + "; ".join(described.values())
            + ". Extract them all with one kind"
        )
    if expect_weights:
        wrong = [
            described[path]
            for path, kind in kinds.items()
            if (kind == "tiny") != (expect_weights == "tiny") or not kind
        ]
        if wrong:
            raise UserError(f"this run expects {expect_weights} weights: " + "; ".join(wrong))
    if expect_dtype:
        wrong = [
            f"{path}: {provenance.get('dtype')}"
            for path, provenance in provenance_of.items()
            if provenance.get("dtype") != expect_dtype
        ]
        if wrong:
            raise UserError(
                f"this run expects features extracted in {expect_dtype}: " + "; ".join(wrong)
            )
    _check_one_checkpoint_per_source(provenance_of, kinds)


def _check_one_checkpoint_per_source(
    provenance_of: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str]
) -> None:
    fingerprints: dict[str, dict[str, str]] = {}
    for path, provenance in provenance_of.items():
        if kinds[path] in ("hub", "folder") and provenance.get("weights_fingerprint"):
            source = str(provenance.get("source"))
            fingerprints.setdefault(source, {})[path] = str(provenance["weights_fingerprint"])
    for source, of_path in fingerprints.items():
        if len(set(of_path.values())) > 1:
            listed = "; ".join(f"{path}: {print_[:12]}" for path, print_ in of_path.items())
            raise UserError(
                f"feature files of {source} come from different checkpoints (weights "
                f"fingerprints {listed}); extract them from one"
            )
