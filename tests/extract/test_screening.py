"""Bad image files and reports are named with a short reason; good ones pass."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.screening import check_image, screen_report


def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """One file per kind of damage, named after the reason screening should give."""
    png, jpeg = _encoded("PNG"), _encoded("JPEG")
    files = {
        "good.png": png,
        "good.jpg": jpeg,
        "zero.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header_only.png": png[:40],  # cut inside the header: still a damaged PNG
        "text.png": "左侧声带白斑\n".encode(),
        "random.png": np.random.default_rng(1).bytes(4096),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("good.png", None),
        ("good.jpg", None),
        ("absent.png", "missing"),
        ("zero.png", "zero-byte"),
        ("truncated.png", "truncated or undecodable"),
        ("truncated.jpg", "truncated or undecodable"),
        ("header_only.png", "truncated or undecodable"),
        ("text.png", "not an image"),
        ("random.png", "not an image"),
    ],
)
def test_screen_image_names_the_damage(bad_folder, name, reason):
    assert check_image(bad_folder / name)[1] == reason


def test_a_folder_is_missing_not_an_image(tmp_path):
    assert check_image(tmp_path)[1] == "missing"


def test_images_over_the_pixel_limit_are_too_large(bad_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    assert check_image(bad_folder / "good.png")[1] == "too large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # PIL's own error, too
    assert check_image(bad_folder / "good.png")[1] == "too large"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("左侧声带前中段可见白色斑块。", None),
        ("line one\n\tline two\r\n", None),  # tab, LF and CR are ordinary text
        ("", "empty"),
        (" \n\t\u3000", "whitespace-only"),  # U+3000 is the CJK full-width space
        ("声带\x00白斑", "control characters"),
        ("bell\x07", "control characters"),
        ("delete\x7f", "control characters"),
        ("caf\u0083 (UTF-8 read as Latin-1)", "control characters"),
    ],
)
def test_screen_report(text, reason):
    assert screen_report(text) == reason
