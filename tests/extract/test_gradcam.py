"""Grad-CAM over patch tokens: the maps of every encoder with patch tokens, a case whose
answer is known, the mapping back through resize and crop, and encoders without tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from extract.gradcam import PatchTokens, on_image, patch_maps, patch_tokens_of
from extract.loaders import load_encoder
from extract.preprocess import ImageTransform, image_transform
from extract.registry import available_encoders, get_spec
from pipeline.errors import UserError

WITH_PATCH_TOKENS = ("blip2-qformer", "blip2-vit", "clip-image", "chinese-clip-image")


def test_the_registry_says_which_image_encoders_have_patch_tokens():
    image_encoders = [name for name in available_encoders() if get_spec(name).modality == "image"]
    assert sorted(name for name in image_encoders if get_spec(name).patch_tokens) == sorted(
        WITH_PATCH_TOKENS
    )


@pytest.mark.parametrize("name", ["align-image", "vilt", "llama3"])
def test_an_encoder_without_patch_tokens_is_refused_in_one_line(name):
    with pytest.raises(UserError, match=f"encoder {name} .* has no patch tokens") as error:
        patch_tokens_of(get_spec(name))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", WITH_PATCH_TOKENS)
def test_the_map_has_the_image_size_and_is_finite(name):
    spec = get_spec(name)
    encoder = load_encoder(spec, "tiny", torch.device("cpu"), torch.float32)
    encoder.model.requires_grad_(False)
    transform = image_transform(encoder.preprocessing)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for width, height in ((320, 256), (288, 352))
    ]
    pixels = torch.stack([transform(image) for image in images])
    direction = torch.randn(encoder.width, generator=torch.Generator().manual_seed(0))
    grids, vectors = patch_maps(
        encoder.model,
        patch_tokens_of(spec),
        encoder.encode,
        pixels,
        lambda output: output @ direction,
    )
    assert torch.allclose(vectors, encoder.encode(pixels))  # the hook changes no output
    for grid, image in zip(grids, images, strict=True):
        heatmap = on_image(grid, transform, image.size)
        assert heatmap.shape == (image.height, image.width)
        assert np.isfinite(heatmap).all() and (heatmap >= 0).all() and heatmap.max() > 0


class _Block(nn.Module):
    """A transformer block stand-in that keeps each token as it is."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * 1.0


class _RednessViT(nn.Module):
    """A ViT-shaped model whose patch tokens are each patch's mean colour (one class token
    first), and whose output is the mean of its patch tokens."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.avg_pool2d(pixels, self.patch).flatten(2).transpose(1, 2)  # [N, P, 3]
        hidden = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden[:, 1:].mean(dim=1)


@pytest.mark.parametrize(
    ("transform", "size", "patch_box"),
    [
        # 448x336 squashed to 224x224: a 32-pixel patch is 64x48 image pixels; the patch in
        # column 6 (the last), row 1 covers x 384-448, y 48-96.
        (ImageTransform(224, (0, 0, 0), (1, 1, 1), "bilinear"), (448, 336), (388, 52, 444, 92)),
        # CLIP's: the shorter side to 224 (x0.7: 280x224), then a centre crop from x = 28,
        # so the patch in column 6, row 1 covers x (28 + 192) / 0.7 = 314 to 360, y 46-91.
        (
            ImageTransform(224, (0, 0, 0), (1, 1, 1), "bilinear", "shortest_edge", 224),
            (400, 320),
            (318, 50, 356, 88),
        ),
    ],
)
def test_the_heatmap_peaks_on_the_patch_whose_token_carries_the_signal(transform, size, patch_box):
    """A head that reads redness, on an image black but for one red patch: Grad-CAM must
    point at that patch, in the original image's pixels."""
    width, height = size
    left, top, right, bottom = patch_box
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[top:bottom, left:right] = (255, 0, 0)
    image = Image.fromarray(pixels)
    model = _RednessViT(patch=32)
    grids, _ = patch_maps(
        model,
        PatchTokens("blocks", 1),
        model,
        transform(image).unsqueeze(0),
        lambda output: output[:, 0] - output[:, 2],  # red minus blue
    )
    heatmap = on_image(grids[0], transform, image.size)
    peak_y, peak_x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert left <= peak_x < right and top <= peak_y < bottom


def test_a_score_that_ignores_the_image_gives_a_zero_map():
    """A head whose input selection left the image out: no gradient reaches the patches."""
    image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    model = _RednessViT(patch=32)
    transform = ImageTransform(64, (0, 0, 0), (1, 1, 1), "bilinear", "resize", None)
    grids, _ = patch_maps(
        model,
        PatchTokens("blocks", 1),
        model,
        transform(image).unsqueeze(0),
        lambda output: torch.zeros(len(output), requires_grad=True),
    )
    assert grids.shape[0] == 1 and torch.count_nonzero(torch.as_tensor(grids)) == 0
