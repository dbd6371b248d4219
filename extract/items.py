"""The items a pass encodes: the distinct images, reports or image-report pairs of a
manifest, keyed by content, with those that cannot be encoded left out and named.

Each image file is read once per pass: its content key (the sha256 of those bytes, as
pipeline.keys.file_key), its screening (extract.screening, which decodes it) and, later,
the pixels every encoder of the pass sees all come from that one read. What it gave is
held for the encoding, up to HELD_IMAGE_BYTES per process: the decoded image (so that it
is decoded once, too), or once decoded images fill the budget the file's bytes; an image
past the budget, or one another process read, is read again when it is encoded.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm

from extract.screening import decode_screened, read_image_bytes, screen_report, shown_safely
from pipeline.errors import UserError
from pipeline.keys import bytes_key, normalise_text, pair_key, text_key

# refuse_conflicts and refuse_rows: the manifest's own checks and messages, given the
# content the pass read instead of hashing every file again (load_manifest's check_images
# reads them all): see check_image_files and check_one_patient_per_image.
from pipeline.manifest import image_file, refuse_conflicts, refuse_rows

REPORT_NAME_CHARS = 40  # of a report, in messages and in the skipped items' names
# What a process keeps from its one read of the images for the encoding: decoded images
# (the demo's 5,900 at 288 x 288 RGB: 1.5 GB), then compressed files (the demo's: 360 MB).
# The images past it are read again when encoded rather than fill the memory.
HELD_IMAGE_BYTES = 2 << 30
INLINE_READS = 256  # image files so few that reading threads would not pay


@dataclass(frozen=True)
class ImageCheck:
    """What the one read of an image file found."""

    key: str  # content key; "" for a file that cannot be encoded
    reason: str | None  # why it cannot (extract.screening), or None
    # What the one-patient-per-image check compares: the key of the bytes (a damaged file
    # has bytes too), or for a file without bytes its path, as load_manifest does.
    identity: str


@dataclass
class ImageReads:
    """One process's reads: every path's check and, up to the budget, the bytes read."""

    checks: dict[str, ImageCheck] = field(default_factory=dict)  # manifest image path ->
    # image file -> its decoded image or, past the budget for those, its bytes
    held: dict[Path, Image.Image | bytes] = field(default_factory=dict)


def paths_to_read(paths: Sequence[str], batch_size: int, rank: int, processes: int) -> list[str]:
    """The image paths process `rank` reads: blocks of `batch_size` in turn, as the
    encoding deals out batches, so that in a first run each process mostly encodes the
    images whose bytes it holds."""
    return [path for index, path in enumerate(paths) if (index // batch_size) % processes == rank]


def _read_one(location: Path) -> tuple[bytes | None, str, str | None, Image.Image | None]:
    """One image file read once, keyed and screened: (bytes or None, key, reason, the
    decoded image or None)."""
    data, reason = read_image_bytes(location)
    if data is None:
        return None, "", reason, None
    image, reason = decode_screened(location, data)
    return data, bytes_key(data) if data else "", reason, image


def read_images(
    paths: Sequence[str],
    manifest_path: str | Path,
    image_root: str | Path | None = None,
    show_progress: bool = False,
    threads: int | None = None,
) -> ImageReads:
    """Read each image file once: key it, screen it, and keep what it gave for the encoding.

    Args:
        paths: manifest image paths (relative to the manifest's folder).
        image_root: the folder images may lie in; None: the manifest's folder.
        threads: threads reading and decoding (reading, hashing and PIL's decoders release
            the GIL, and a thread hands over a decoded image without copying it); None: one
            per CPU core this process may use, as nothing else runs yet; at most
            INLINE_READS files are read in this thread.
    """
    locations = [image_file(manifest_path, path, image_root) for path in paths]
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if len(paths) > INLINE_READS else 1
    reads = ImageReads()
    held_bytes, decoded_full = 0, False
    progress = tqdm(
        total=len(paths), desc="reading images", unit="image", disable=not show_progress
    )
    with ThreadPoolExecutor(threads) as pool, progress:
        reads_in_order = pool.map(_read_one, locations)
        for path, location, read in zip(paths, locations, reads_in_order, strict=True):
            data, key, reason, image = read
            # a file without bytes is no image: told apart by path, as load_manifest does
            identity = key or os.path.normpath(location)
            reads.checks[path] = ImageCheck("" if reason else key, reason, identity)
            if not reason:
                decoded = image.width * image.height * len(image.getbands())
                decoded_full = decoded_full or held_bytes + decoded > HELD_IMAGE_BYTES
                kept = (data, len(data)) if decoded_full else (image, decoded)
                if held_bytes + kept[1] <= HELD_IMAGE_BYTES:
                    reads.held[location] = kept[0]
                    held_bytes += kept[1]
            progress.update()
    return reads


def check_image_files(
    table: pd.DataFrame, manifest_path: str | Path, image_root: str | Path | None, strict: bool
) -> None:
    """Before any image is read: every image lies inside the image root and, with
    `strict`, exists (load_manifest's own checks and messages, without its hashing).

    Raises:
        UserError: naming the column and the first lines at fault.
    """
    manifest_path = Path(manifest_path)

    def outside(path: str) -> bool:
        try:
            image_file(manifest_path, path, image_root)
        except UserError:
            return True
        return False

    root = Path(os.path.abspath(image_root or manifest_path.parent))
    refuse_rows(
        manifest_path,
        table,
        "image_path",
        table["image_path"].map(outside),
        f"image outside the image root {root} (name a root that holds it)",
    )
    if strict:
        absent = ~table["image_path"].map(
            lambda path: image_file(manifest_path, path, image_root).is_file()
        )
        refuse_rows(
            manifest_path,
            table,
            "image_path",
            absent,
            f"image file not found (paths are relative to {manifest_path.parent})",
        )


def check_one_patient_per_image(
    table: pd.DataFrame, manifest_path: str | Path, checks: Mapping[str, ImageCheck]
) -> None:
    """One image content under two patients would let a test patient's image train the
    head (load_manifest's rule, from the content the pass read).

    Raises:
        UserError: naming the first two lines that share an image across patients.
    """
    identity = table["image_path"].map(lambda path: checks[path].identity)
    refuse_conflicts(
        Path(manifest_path),
        table,
        "patient_id",
        identity,
        "the same image content is under two patients",
    )


@dataclass(frozen=True)
class UniqueItems:
    """The distinct contents of a manifest column, each to be encoded once."""

    keys: list[str]  # content keys (pipeline.keys), in order of first appearance
    # per key what the encoder reads: an image file, a normalised report, or both (a pair)
    inputs: list[Any]
    names: list[str]  # per key what a message shows: an image path, a report's beginning
    sources: dict[str, str]  # manifest image_path -> image key; empty for reports
    skipped: dict[str, str]  # item name (see cache.store) -> why it cannot be encoded


def _report_name(key: str, report: str) -> str:
    # shown_safely: a NUL cannot be stored in the file's string datasets
    return f"{key} {shown_safely(report[:REPORT_NAME_CHARS])}"


def unique_items(
    table: pd.DataFrame,
    manifest_path: str | Path,
    modality: str,
    image_checks: Mapping[str, ImageCheck],
    image_root: str | Path | None = None,
) -> UniqueItems:
    """Key every image file (by its bytes), report (by its normalised text) or image-report
    pair (by both keys) of `table`, leaving out the items screening finds unusable.

    Args:
        image_checks: read_images' checks of the table's image paths (unused for reports).
        image_root: the folder images may lie in; None: the manifest's folder.

    A bad image is skipped with its reason, and so is an unusable report, and a pair
    either of whose halves is.
    """
    skipped: dict[str, str] = {}
    sources: dict[str, str] = {}
    if modality in ("image", "pair"):
        for path in table["image_path"].unique():
            check = image_checks[path]
            if check.reason:
                skipped[path] = check.reason
            else:
                sources[path] = check.key
    bad_reports: set[str] = set()
    if modality in ("text", "pair"):
        for report in table["report_text"].unique():
            reason = screen_report(report)
            if reason:
                bad_reports.add(report)
                skipped[_report_name(text_key(report), normalise_text(report))] = reason
    inputs: dict[str, Any] = {}
    names: dict[str, str] = {}
    if modality == "image":
        for path, key in sources.items():  # identical files under two names: encode one
            inputs.setdefault(key, image_file(manifest_path, path, image_root))
            names.setdefault(key, path)
    elif modality == "pair":
        for path, report in zip(table["image_path"], table["report_text"], strict=True):
            if path in sources and report not in bad_reports:
                key = pair_key(sources[path], text_key(report))
                text = normalise_text(report)
                inputs.setdefault(key, (image_file(manifest_path, path, image_root), text))
                names.setdefault(key, f"{path} | {text[:REPORT_NAME_CHARS]}")
    else:
        for report in table["report_text"]:
            if report not in bad_reports:
                key, text = text_key(report), normalise_text(report)
                inputs.setdefault(key, text)
                names.setdefault(key, text[:REPORT_NAME_CHARS])
    return UniqueItems(list(inputs), list(inputs.values()), list(names.values()), sources, skipped)


def skipped_summary(skipped: Mapping[str, str]) -> str:
    """How many items were left out, by reason, and the first few."""
    counts = Counter(skipped.values())
    first = "; ".join(f"{name} ({reason})" for name, reason in list(skipped.items())[:3])
    by_reason = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
    return f"{len(skipped)} bad item(s) ({by_reason}); first: {first}"


def summarise_skipped(skipped: Mapping[str, str]) -> None:
    """Warn of the items left out; at the end of a run, so that it is not lost above the
    progress bars."""
    if skipped:
        print(f"warning: skipped {skipped_summary(skipped)}", file=sys.stderr)
