"""Screening: which images and reports cannot be encoded, and why, in a few words.

The extraction pass reads every image file once (read_image_bytes) and asks these of
the bytes before encoding (extract.items); an item with a reason is skipped and recorded
with that reason instead of stopping the run. Reasons are fixed strings, so skipped items
can be counted by reason.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from extract.preprocess import ImageTooLarge, decode_image
from pipeline.keys import bytes_key

MISSING = "missing"
UNREADABLE = "unreadable"  # no permission to read it, or an I/O error
SYMLINK_LOOP = "symlink loop"
ZERO_BYTE = "zero-byte"
NOT_AN_IMAGE = "not an image"
UNDECODABLE = "truncated or undecodable"
TOO_LARGE = "too large"
EMPTY = "empty"
WHITESPACE_ONLY = "whitespace-only"
CONTROL_CHARACTERS = "control characters"

# How image formats begin: a file that starts like one but does not open is a damaged
# image, not some other kind of file.
_IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"RIFF",  # WebP
)
# C0 controls except tab, line feed and carriage return, DEL, and the C1 controls. Typed
# text never holds them; they come from binary data or from text decoded with the wrong
# encoding (UTF-8 read as Latin-1 yields C1 characters).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def read_image_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """An image file's bytes, read once: (bytes, None), or (None, why they cannot be read)
    with the reason "missing" (no file, a folder or a symlink to nothing), "unreadable"
    (no permission, an I/O error) or "symlink loop"."""
    try:
        return Path(path).read_bytes(), None
    except (FileNotFoundError, IsADirectoryError):
        return None, MISSING
    except OSError as error:
        return None, SYMLINK_LOOP if error.errno == errno.ELOOP else UNREADABLE


def decode_screened(path: Path, data: bytes) -> tuple[Image.Image | None, str | None]:
    """The bytes of an image file decoded, or why they cannot be encoded.

    Decodes the whole file with the same code extraction uses (`decode_image`), so bytes
    that pass here also decode there, to the very image returned.

    Returns:
        (the RGB image, None), or (None, reason) with the reason one of "zero-byte",
        "not an image" (a file of another kind, e.g. text named .png), "truncated or
        undecodable" (starts like an image but its data is cut short or corrupt), "too
        large" (over PIL.Image.MAX_IMAGE_PIXELS).
    """
    if not data:
        return None, ZERO_BYTE
    try:
        return decode_image(path, data), None
    except ImageTooLarge:
        return None, TOO_LARGE
    except UnidentifiedImageError:
        return None, UNDECODABLE if data.startswith(_IMAGE_SIGNATURES) else NOT_AN_IMAGE
    except (OSError, SyntaxError, ValueError, EOFError):
        return None, UNDECODABLE


def screen_image_bytes(path: Path, data: bytes) -> str | None:
    """None for the bytes of an image that can be encoded, else why not (decode_screened)."""
    return decode_screened(path, data)[1]


def check_image(path: Path) -> tuple[str, str | None]:
    """Read an image file once: its content key (pipeline.keys) and whether it decodes.

    Returns:
        (key, None) for a usable image; ("", reason) otherwise, the reason one of those of
        read_image_bytes and screen_image_bytes.
    """
    data, reason = read_image_bytes(path)
    if data is not None:
        reason = screen_image_bytes(path, data)
    return ("", reason) if reason else (bytes_key(data), None)


def shown_safely(text: str) -> str:
    """`text` with each control character written as an escape (U+0000 as \\x00), so that
    it can be shown and stored as a name."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def screen_report(text: str) -> str | None:
    """None for a report that can be encoded, else why not.

    Returns:
        None, or one of "empty", "whitespace-only", "control characters" (any of U+0000
        to U+001F other than tab, line feed and carriage return, U+007F, or U+0080 to
        U+009F).
    """
    if not text:
        return EMPTY
    if not text.strip():
        return WHITESPACE_ONLY
    if _CONTROL.search(text):
        return CONTROL_CHARACTERS
    return None
