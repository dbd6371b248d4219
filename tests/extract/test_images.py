"""Odd but valid images become the RGB tensor an encoder expects, by to_rgb's one rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.preprocess import DecodedImages, decode_image, image_transform, to_rgb
from pipeline.errors import UserError

SIZE = 8
# mean 0, std 1: the tensor holds pixel / 255, so expected values read as fractions.
TRANSFORM = image_transform(
    {"image_size": SIZE, "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "nearest"}
)


def tensor_of(path: Path) -> torch.Tensor:
    pixels = DecodedImages([path], [TRANSFORM])[0][0]
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.uint8
    tensor = TRANSFORM.normalise(pixels[None])[0]
    assert tensor.dtype == torch.float32
    return tensor


def colour_of(path: Path) -> list[float]:
    """The one colour of a flat image, per channel on [0, 1]."""
    tensor = tensor_of(path)
    assert torch.all(tensor == tensor[:, :1, :1]), "expected a flat image"
    return [round(float(value), 3) for value in tensor[:, 0, 0]]


def test_16_bit_grayscale_keeps_its_scale(tmp_path):
    for level, expected in ((65535, 1.0), (32768, 0.502), (0, 0.0)):
        path = tmp_path / f"gray16_{level}.png"
        Image.fromarray(np.full((20, 30), level, np.uint16)).save(path)
        with Image.open(path) as image:
            assert image.mode.startswith("I")
        assert colour_of(path) == [expected] * 3


def test_cmyk(tmp_path):
    path = tmp_path / "cyan.jpg"
    Image.new("CMYK", (20, 20), (255, 0, 0, 0)).save(path, quality=100)
    red, green, blue = colour_of(path)
    assert red < 0.05 and green > 0.95 and blue > 0.95


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), [0.0, 0.0, 0.0]),  # transparent: black, not its red
        ("RGBA", (255, 0, 0, 255), [1.0, 0.0, 0.0]),
        ("RGBA", (255, 255, 255, 128), [0.502, 0.502, 0.502]),  # half onto black
        ("LA", (255, 0), [0.0, 0.0, 0.0]),
        ("LA", (255, 255), [1.0, 1.0, 1.0]),
    ],
)
def test_transparency_is_composited_onto_black(tmp_path, mode, colour, expected):
    path = tmp_path / "alpha.png"
    Image.new(mode, (20, 20), colour).save(path)
    assert colour_of(path) == expected


def test_palette_with_a_transparent_entry(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 255, 255, 255, 255])  # entry 0 blue, entry 1 white
    image.save(path, transparency=1)
    assert colour_of(path) == [0.0, 0.0, 0.0]
    image.save(path)  # the same palette, nothing transparent
    assert colour_of(path) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_animations_give_their_first_frame(tmp_path, suffix):
    path = tmp_path / f"animated{suffix}"
    frames = [Image.new("RGB", (20, 20), colour) for colour in ("red", "blue", "lime")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as image:
        assert image.n_frames == 3
        image.seek(2)  # wherever a reader left it
        assert to_rgb(image).getpixel((0, 0)) == (255, 0, 0)
    assert colour_of(path) == [1.0, 0.0, 0.0]


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(path, exif=exif, quality=100)
    upright = decode_image(path)
    assert upright.size == (20, 40)  # width and height swap
    # The black left half is now on top.
    assert upright.getpixel((10, 5))[0] < 30 and upright.getpixel((10, 35))[0] > 225
    assert to_rgb(upright) is upright  # once upright, it stays as it is


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    assert colour_of(path) == [1.0, 0.0, 0.0]


def test_one_bit_image(tmp_path):
    path = tmp_path / "bit.png"
    Image.new("1", (20, 20), 1).save(path)
    assert colour_of(path) == [1.0, 1.0, 1.0]


def test_undecodable_and_too_large_images_stop_with_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.new("RGB", (30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="cannot decode image .*large.png"):
        DecodedImages([path], [TRANSFORM])[0][0]
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot decode image .*text.png"):
        DecodedImages([tmp_path / "text.png"], [TRANSFORM])[0]


def test_transforms_that_place_an_image_alike_share_one_resize(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(square)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(wide)
    settings = {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}
    transforms = [
        image_transform({**settings, "interpolation": "bicubic"}),  # BLIP-2's square resize
        image_transform({**settings, "interpolation": "bicubic", "resize": "shortest_edge"}),
        image_transform({**settings, "interpolation": "bilinear"}),
    ]
    resizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda image, *a, **k: resizes.append(a) or resize(image, *a, **k)
    )
    # on a square image CLIP's shortest edge and crop is the square resize; on a wide one
    # it is not, and another interpolation never is
    for path, expected_resizes in ((square, 2), (wide, 3)):
        resizes.clear()
        pixels = DecodedImages([path], transforms)[0]
        assert len(resizes) == expected_resizes, path.name
        assert all(made.shape == (3, 224, 224) for made in pixels.values())
        image = decode_image(path)
        for which, transform in enumerate(transforms):
            assert torch.equal(pixels[which], transform.pixels(image)), (path.name, which)
    assert not torch.equal(pixels[0], pixels[1])
