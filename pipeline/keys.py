"""Content keys: the identity of an image or a report, independent of where it is stored.

Two files with the same bytes share one key (and one encoder run); two different files
with the same name do not collide.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

KEY_SCHEMES = {
    "image": "sha256 of the image file's bytes",
    "text": "sha256 of the UTF-8 report after Unicode NFC and stripping outer whitespace",
    "pair": "sha256 of '<image key>:<report key>'",
}
_CHUNK_BYTES = 1 << 20


def file_key(path: str | Path) -> str:
    """The key of an image: a hash of the file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_key(data: bytes) -> str:
    """file_key of a file holding `data`, for bytes already read."""
    return hashlib.sha256(data).hexdigest()


def normalise_text(text: str) -> str:
    """The form of a report that is hashed and encoded: NFC, outer whitespace removed."""
    return unicodedata.normalize("NFC", text).strip()


def text_key(text: str) -> str:
    """The key of a report: a hash of its normalised text."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def pair_key(image_content_key: str, report_content_key: str) -> str:
    """The key of an image-report pair (for pair encoders such as ViLT): a hash of both keys."""
    return hashlib.sha256(f"{image_content_key}:{report_content_key}".encode()).hexdigest()
