"""From a registry entry to a loaded encoder: which class runs each loader, and the checks
that the weights match the entry."""

from __future__ import annotations

import torch

from extract.auto_encoders import (
    DecoderTextEncoder,
    DualEncoder,
    EncoderImageEncoder,
    EncoderTextEncoder,
    ViltEncoder,
)
from extract.blip2 import Blip2QFormerEncoder, Blip2TextEncoder, Blip2VitEncoder
from extract.encoders import Encoder, resolve_weights
from extract.registry import EncoderSpec
from pipeline.errors import UserError

ENCODER_CLASSES: dict[str, type[Encoder]] = {
    "blip2-qformer": Blip2QFormerEncoder,
    "blip2-vit": Blip2VitEncoder,
    "blip2-text": Blip2TextEncoder,
    "decoder-text": DecoderTextEncoder,
    "encoder-text": EncoderTextEncoder,
    "encoder-image": EncoderImageEncoder,
    "dual-encoder": DualEncoder,
    "vilt": ViltEncoder,
}


def load_encoder(
    spec: EncoderSpec, weights: str, device: torch.device, dtype: torch.dtype
) -> Encoder:
    """Load the encoder `spec` describes from --weights `weights` ("tiny", "hub", a folder).

    Raises:
        UserError: unavailable weights, or weights from the entry's source whose output
            width differs from the entry's.
    """
    encoder = ENCODER_CLASSES[spec.loader].load(spec, resolve_weights(spec, weights), device, dtype)
    if encoder.weights.kind == "hub" and spec.width and encoder.width != spec.width:
        raise UserError(
            f"{spec.source} gives {encoder.width}-d vectors but {spec.where} says "
            f"{spec.width}: correct its width"
        )
    return encoder
