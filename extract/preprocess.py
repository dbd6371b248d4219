"""Image preprocessing built from an encoder spec alone, and the datasets that apply it.

RGB (by `to_rgb`'s rule), resize, optionally centre-crop, scale to [0, 1], normalise per
channel. Two resizes cover the registered encoders: "square" (BLIP-2, Chinese-CLIP, ALIGN
before its crop, ViLT) and "shortest_edge" then a centre crop (CLIP), as their image
processors do. A pass resizes each image once per geometry, not once per encoder: on a
square image CLIP's resize and crop is BLIP-2's and Chinese-CLIP's square resize.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from pipeline.errors import UserError

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


RESIZES = ("square", "shortest_edge")
# Modes holding one intensity per pixel on a 16-bit scale: PNG and TIFF 16-bit grayscale.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_UNIT16_TO_UNIT8 = 255 / 65535
# Hugging Face image processors store PIL's resampling filter as its number.
_PIL_FILTER_NAMES = {3: "bicubic", 2: "bilinear", 0: "nearest"}


class ImageTooLarge(ValueError):
    """An image with more pixels than PIL.Image.MAX_IMAGE_PIXELS (see `decode_image`)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image an encoder sees, by one rule for every kind of file.

    - Animated GIF/PNG/WebP, multi-page TIFF: the first frame.
    - EXIF orientation is applied (a phone photo tagged "rotate 90" is encoded upright, so
      its width and height swap).
    - 16-bit (and 32-bit integer or float) grayscale is read on the 16-bit scale,
      0..65535, and scaled to 0..255 (PIL's own conversion clips it, which turns
      every pixel above 255 white); values outside the scale are clipped.
    - Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited
      onto black: transparent pixels hold arbitrary colours, and black is what surrounds
      the field of view in an endoscope frame.
    - CMYK, YCbCr, 1-bit, palette and the rest: PIL's conversion (embedded ICC colour
      profiles are not applied).
    - Any size, down to 1x1, is kept: the transform resizes afterwards.

    Returns the image itself when it is already RGB and upright (no copy).
    """
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
    if image.mode in _WIDE_GRAY_MODES:
        intensities = np.asarray(image, dtype=np.float32) * _UNIT16_TO_UNIT8
        gray = np.clip(np.rint(intensities), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    # 0x0112 is the EXIF Orientation tag; 1 means "stored upright".
    return int(image.getexif().get(0x0112, 1) or 1)


def decode_image(path: Path, data: bytes | None = None) -> Image.Image:
    """Decode an image file completely and convert it by `to_rgb`'s rule.

    `data`, if given, is the file's bytes, already read (`path` then only names it).

    Size policy: an image with more pixels than PIL.Image.MAX_IMAGE_PIXELS (PIL's
    decompression-bomb threshold, 89,478,485 by default: about 9,459 x 9,459; an
    endoscope frame has about 2 million) is refused rather than decoded with PIL's
    warning, because decoding it could exhaust memory. Raise that limit in PIL if your
    images are larger.

    Raises:
        ImageTooLarge: above the size limit.
        OSError: not an image (PIL.UnidentifiedImageError), unreadable, truncated or
            corrupt; SyntaxError, ValueError or EOFError from some decoders of damaged files.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLarge(f"{path}: {error}") from None


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 tensor [3, size, size] (a dataclass: DataLoader workers pickle it).

    In two steps: `pixels` resizes and crops (uint8, what a DataLoader worker sends: a
    quarter of the float32 tensor's bytes through shared memory), `normalise` scales a
    batch of them where the encoder runs.
    """

    image_size: int  # pixels per side after a square resize, or of the shorter side
    mean: tuple[float, float, float]  # per RGB channel, on the [0, 1] scale
    std: tuple[float, float, float]
    interpolation: str  # a key of INTERPOLATIONS
    resize: str = "square"  # one of RESIZES
    crop_size: int = 0  # side of the centre crop after resizing; 0: no crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.pixels(image))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The image resized (and cropped) as the encoder sees it: uint8 [3, size, size]."""
        image = to_rgb(image)
        return self.placed(image, self.geometry(*image.size))

    def placed(
        self, image: Image.Image, geometry: tuple[tuple[int, int], tuple[int, int, int, int] | None]
    ) -> torch.Tensor:
        """An RGB image resized and cut as `geometry` (this transform's, for its size) says."""
        size, box = geometry
        resized = image.resize(size, INTERPOLATIONS[self.interpolation])
        if box is not None:
            resized = resized.crop(box)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1)))

    def geometry(
        self, width: int, height: int
    ) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
        """Where an image of this size goes: its size after resizing, and the box then cut
        from it (None: the whole resized image). Transforms of equal geometry and
        interpolation give equal pixels: on a square image, CLIP's shortest-edge resize and
        crop is BLIP-2's square resize."""
        if self.resize == "square":
            size = (self.image_size, self.image_size)
        else:  # the shorter side becomes image_size, the longer keeps the aspect ratio
            scale = self.image_size / min(width, height)
            size = (
                (self.image_size, int(height * scale))
                if width <= height
                else (int(width * scale), self.image_size)
            )
        if not self.crop_size:
            return size, None
        left, top = (size[0] - self.crop_size) // 2, (size[1] - self.crop_size) // 2
        box = (left, top, left + self.crop_size, top + self.crop_size)
        return size, None if box == (0, 0, *size) else box

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] -> float32 (pixel / 255 - mean) / std, on their device."""
        # One multiply and one add, each rounded in float32: the same values on every device.
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        scale = torch.from_numpy(1 / (255 * std))[:, None, None].to(pixels.device)
        offset = torch.from_numpy(-mean / std)[:, None, None].to(pixels.device)
        return pixels.float().mul_(scale).add_(offset)


def image_transform(preprocessing: Mapping[str, Any]) -> ImageTransform:
    """The transform an image encoder's spec describes.

    Raises:
        UserError: an unknown interpolation or resize, or a missing key.
    """
    interpolation = preprocessing.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise UserError(
            f"preprocessing interpolation '{interpolation}' is not one of {list(INTERPOLATIONS)}"
        )
    resize = preprocessing.get("resize", "square")
    if resize not in RESIZES:
        raise UserError(f"preprocessing resize '{resize}' is not one of {list(RESIZES)}")
    image_size = preprocessing.get("image_size")
    # Batches need one shape: a shortest-edge resize must be followed by a square crop.
    crop_size = int(preprocessing.get("crop_size", image_size if resize == "shortest_edge" else 0))
    try:
        return ImageTransform(
            image_size=int(preprocessing["image_size"]),
            mean=tuple(preprocessing["mean"]),
            std=tuple(preprocessing["std"]),
            interpolation=interpolation,
            resize=resize,
            crop_size=crop_size,
        )
    except KeyError as error:
        raise UserError(f"image preprocessing lacks {error}") from None


def _side(size: Any) -> tuple[str, int]:
    """A Hugging Face size setting -> (resize, pixels)."""
    if isinstance(size, int):
        return "square", size
    if "shortest_edge" in size:
        return "shortest_edge", int(size["shortest_edge"])
    if size.get("height") != size.get("width"):
        raise UserError(f"non-square image size {size} is not supported; set image_size")
    return "square", int(size["height"])


def preprocessing_from_folder(folder: Path) -> dict[str, Any]:
    """Image preprocessing read from a checkpoint's preprocessor_config.json.

    Raises:
        UserError: the folder has no such file, or one this module cannot follow; the
            message says to give the settings in the registry entry instead.
    """
    path = Path(folder) / "preprocessor_config.json"
    fix = "give preprocessing (image_size, mean, std) in the registry entry"
    try:
        processor = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is missing or unreadable: {fix}") from None
    try:
        resize, image_size = _side(processor["size"])
        settings: dict[str, Any] = {"image_size": image_size, "resize": resize}
        if processor.get("do_center_crop", resize == "shortest_edge") and "crop_size" in processor:
            settings["crop_size"] = _side(processor["crop_size"])[1]
        if processor.get("do_normalize", True):
            settings["mean"], settings["std"] = processor["image_mean"], processor["image_std"]
        elif processor.get("rescale_offset"):  # pixels to [-1, 1], as EfficientNet's does
            settings["mean"], settings["std"] = [0.5] * 3, [0.5] * 3
        else:
            settings["mean"], settings["std"] = [0.0] * 3, [1.0] * 3
        settings["interpolation"] = _PIL_FILTER_NAMES[int(processor.get("resample", 3))]
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: cannot follow its setting {error}: {fix}") from None
    return settings


class DecodedImages(Dataset):
    """Per index an image file decoded once and resized by each transform it needs (in
    DataLoader workers when asked): one decoding feeds every encoder of a pass.

    An item is {transform index: uint8 tensor [3, size, size]} (ImageTransform.pixels;
    its `normalise` makes the encoder's input), or with `texts` the pair (that, its text).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transforms: Sequence[ImageTransform],
        held: Mapping[Path, Image.Image | bytes] | None = None,
        needs: Sequence[Sequence[int]] | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        """
        Args:
            paths: the image file of each index.
            held: images already decoded, or bytes already read, by file; a file not in it
                is read here.
            needs: per index the transforms (indices into `transforms`) to apply; None: all.
            texts: per index a text to pair with the image (pair encoders).
        """
        self.paths = list(paths)
        self.transforms = list(transforms)
        self.held = held or {}
        self.needs = needs
        self.texts = None if texts is None else list(texts)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        path = self.paths[index]
        wanted = range(len(self.transforms)) if self.needs is None else self.needs[index]
        try:
            held = self.held.get(path)
            image = held if isinstance(held, Image.Image) else decode_image(path, held)
            pixels = self._pixels(image, wanted)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise UserError(f"cannot decode image {path}: {error}") from None
        return pixels if self.texts is None else (pixels, self.texts[index])

    def _pixels(self, image: Image.Image, wanted: Sequence[int]) -> dict[int, torch.Tensor]:
        """Each wanted transform's pixels, one resize for those of equal geometry."""
        image = to_rgb(image)  # the size the geometry is planned on is the one resized
        made: dict[tuple, torch.Tensor] = {}
        pixels = {}
        for which in wanted:
            transform = self.transforms[which]
            geometry = transform.geometry(*image.size)
            plan = (transform.interpolation, geometry)
            if plan not in made:
                made[plan] = transform.placed(image, geometry)
            pixels[which] = made[plan]
        return pixels
