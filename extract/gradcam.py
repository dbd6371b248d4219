"""Grad-CAM over an image encoder's patch tokens (Selvaraju et al., 2017, for ViTs).

A forward pre-hook on the encoder's last transformer block (where the registry entry's
`patch_tokens` says the blocks are) swaps the block's input for a leaf tensor that
requires a gradient, so the backward pass starts there and the frozen layers before it
build no graph. The score (any differentiable function of the encoder's output vectors,
e.g. a head's log-probability of a class) is differentiated with respect to those tokens;
each channel is weighted by its gradient averaged over the patches, the weighted sum over
channels is clipped at zero (only evidence for the score), and the patch grid is mapped
back onto the original image through the preprocessing's resize and crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from extract.preprocess import ImageTransform
from extract.registry import EncoderSpec
from pipeline.errors import UserError


@dataclass(frozen=True)
class PatchTokens:
    """Where an encoder's patch tokens are (see EncoderSpec.patch_tokens)."""

    blocks: str  # dotted path of the transformer blocks (a ModuleList) in the loaded model
    prefix_tokens: int  # class/register tokens before the grid of patches


def patch_tokens_of(spec: EncoderSpec) -> PatchTokens:
    """The patch tokens of `spec`'s encoder.

    Raises:
        UserError: the entry declares none (a CNN, a pair model, a text encoder).
    """
    if not spec.patch_tokens:
        raise UserError(
            f"encoder {spec.name} ({spec.loader}, {spec.modality}) has no patch tokens, which "
            "Grad-CAM here needs: explain a head on a ViT-style image encoder (blip2-qformer, "
            "blip2-vit, clip-image, chinese-clip-image), or add patch_tokens to its registry "
            "entry if it has them"
        )
    return PatchTokens(
        str(spec.patch_tokens["blocks"]), int(spec.patch_tokens.get("prefix_tokens", 1))
    )


def _last_block(model: nn.Module, tokens: PatchTokens) -> nn.Module:
    try:
        blocks = model.get_submodule(tokens.blocks)
    except AttributeError:
        raise UserError(
            f"the loaded {type(model).__name__} has no module {tokens.blocks!r}; correct "
            "patch_tokens.blocks in the encoder's registry entry"
        ) from None
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise UserError(
            f"{tokens.blocks!r} of {type(model).__name__} is a {type(blocks).__name__}, not a "
            "list of transformer blocks; correct patch_tokens.blocks in the registry entry"
        )
    return blocks[-1]


@contextmanager
def captured_tokens(model: nn.Module, tokens: PatchTokens) -> Iterator[list[torch.Tensor]]:
    """While open, every forward pass of `model` puts the input of its last block (a leaf
    tensor requiring a gradient, [N, tokens, width]) into the yielded list."""
    captured: list[torch.Tensor] = []

    def swap_input(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        leaf = hidden.detach().requires_grad_(True)
        captured.append(leaf)
        if args:
            return (leaf, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": leaf}

    handle = _last_block(model, tokens).register_forward_pre_hook(swap_input, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def patch_maps(
    model: nn.Module,
    tokens: PatchTokens,
    encode: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM maps over the patch grid of a batch.

    Args:
        model: the encoder's model, holding the blocks `tokens` names (frozen: its weights
            need no gradient).
        encode: preprocessed images [N, 3, S, S] -> output vectors [N, width].
        pixels: the preprocessed batch.
        score: output vectors -> one score per image [N]; rows must not interact (each
            image's score depends on its own vector only), so one backward pass gives every
            image its own gradient.

    Returns:
        The maps [N, grid, grid] (float32, >= 0, not normalised), and the output vectors
        (detached) the scores were computed from.
    """
    with captured_tokens(model, tokens) as captured, torch.enable_grad():
        vectors = encode(pixels)
        scores = score(vectors)
        if len(captured) != 1:
            raise RuntimeError(f"the last block ran {len(captured)} times in one pass")
        # A head that left the image out (input selection) gives no gradient: a zero map.
        (gradients,) = torch.autograd.grad(
            scores.sum(), captured[0], allow_unused=True, materialize_grads=True
        )
    activations = captured[0].detach().float()[:, tokens.prefix_tokens :]
    gradients = gradients.float()[:, tokens.prefix_tokens :]
    side = math.isqrt(activations.shape[1])
    if side * side != activations.shape[1]:
        raise UserError(
            f"{activations.shape[1]} patch tokens after {tokens.prefix_tokens} prefix token(s) "
            "do not form a square grid; correct patch_tokens.prefix_tokens in the registry entry"
        )
    channel_weights = gradients.mean(dim=1, keepdim=True)  # [N, 1, width]
    maps = (channel_weights * activations).sum(dim=-1).clamp(min=0)
    return maps.reshape(-1, side, side).numpy(), vectors.detach()


def crop_box(transform: ImageTransform, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of an image of `size` (width, height) that the transform's square output
    shows, as (left, top, right, bottom) in the image's pixels."""
    width, height = size
    if transform.resize == "square":
        resized = (transform.image_size, transform.image_size)
    else:  # as ImageTransform: the shorter side becomes image_size
        scale = transform.image_size / min(width, height)
        resized = (
            (transform.image_size, int(height * scale))
            if width <= height
            else (int(width * scale), transform.image_size)
        )
    scale_x, scale_y = resized[0] / width, resized[1] / height
    if not transform.crop_size:
        return 0.0, 0.0, float(width), float(height)
    left = (resized[0] - transform.crop_size) // 2
    top = (resized[1] - transform.crop_size) // 2
    return (
        left / scale_x,
        top / scale_y,
        (left + transform.crop_size) / scale_x,
        (top + transform.crop_size) / scale_y,
    )


def on_image(grid: np.ndarray, transform: ImageTransform, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid map as a map of the original image [height, width]: bilinear over the
    part the encoder saw, 0 where a crop cut the image off (the encoder never saw it)."""
    width, height = size
    left, top, right, bottom = crop_box(transform, size)
    full = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(right)), min(height, round(bottom))
    if x1 <= x0 or y1 <= y0:
        return full
    # Resize the grid to the whole crop box, then keep the part inside the image.
    box_width, box_height = max(1, round(right - left)), max(1, round(bottom - top))
    seen = Image.fromarray(grid.astype(np.float32), mode="F").resize(
        (box_width, box_height), Image.Resampling.BILINEAR
    )
    offset_x, offset_y = x0 - round(left), y0 - round(top)
    full[y0:y1, x0:x1] = np.asarray(seen)[
        offset_y : offset_y + (y1 - y0), offset_x : offset_x + (x1 - x0)
    ]
    return full
