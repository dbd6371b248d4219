"""Image preprocessing built from an encoder spec alone, and the dataset that applies it.

For BLIP-2 this is what its image processor does: RGB, resize to a square with the given
interpolation (no crop), scale to [0, 1], normalise per channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.errors import UserError

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 tensor [3, size, size] (a dataclass: DataLoader workers pickle it)."""

    image_size: int  # pixels per side after resizing
    mean: tuple[float, float, float]  # per RGB channel, on the [0, 1] scale
    std: tuple[float, float, float]
    interpolation: str  # a key of INTERPOLATIONS

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize(
            (self.image_size, self.image_size), INTERPOLATIONS[self.interpolation]
        )
        channels_first = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)
        # (pixel / 255 - mean) / std as one multiply-add: decoding is the bottleneck on a CPU.
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        scale, offset = (1 / (255 * std))[:, None, None], (-mean / std)[:, None, None]
        normalised = np.multiply(channels_first, scale, dtype=np.float32, order="C")
        normalised += offset
        return torch.from_numpy(normalised)


def image_transform(preprocessing: Mapping[str, Any]) -> ImageTransform:
    """The transform an image encoder's spec describes.

    Raises:
        UserError: an unknown interpolation or a missing key.
    """
    interpolation = preprocessing.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise UserError(
            f"preprocessing interpolation '{interpolation}' is not one of {list(INTERPOLATIONS)}"
        )
    try:
        return ImageTransform(
            image_size=int(preprocessing["image_size"]),
            mean=tuple(preprocessing["mean"]),
            std=tuple(preprocessing["std"]),
            interpolation=interpolation,
        )
    except KeyError as error:
        raise UserError(f"image preprocessing lacks {error}") from None


class ImageFiles(Dataset):
    """Decode and transform image files, one per index (in DataLoader workers when asked)."""

    def __init__(self, paths: Sequence[Path], transform: ImageTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image)
        except OSError as error:  # PIL's "cannot identify image file" is one
            raise UserError(f"cannot decode image {self.paths[index]}: {error}") from None
