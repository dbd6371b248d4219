"""From registry entries to loaded encoders: which class runs each loader, which entries
share one checkpoint, and the checks that the weights match the entry."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from extract.auto_encoders import (
    DecoderTextEncoder,
    DualEncoder,
    EncoderImageEncoder,
    EncoderTextEncoder,
    ViltEncoder,
)
from extract.blip2 import Blip2QFormerEncoder, Blip2TextEncoder, Blip2VitEncoder
from extract.encoders import Encoder, Weights, load_sharing, resolve_weights
from extract.registry import LOADERS, EncoderSpec
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


def checkpoint_key(spec: EncoderSpec, weights: Weights) -> str:
    """Which loaded model `spec` runs with `weights`: entries with equal keys are loaded
    once in a pass. They are of one loader family (extract.registry) and read the same
    checkpoint folder, or for tiny weights the same tiny config and tokenizer (tiny weights
    are a function of the config alone)."""
    family = LOADERS[spec.loader].family or spec.loader
    if weights.kind == "tiny":
        tiny = {"config": spec.tiny_config, "tokenizer": str(spec.tiny_tokenizer_folder)}
        return json.dumps({"family": family, "tiny": tiny}, sort_keys=True)
    return json.dumps({"family": family, "folder": str(weights.folder)})


def load_encoders(
    specs: Sequence[EncoderSpec],
    weights: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
) -> list[Encoder]:
    """Load the encoders `specs` describe, each checkpoint once (see checkpoint_key).

    Args:
        weights: the --weights value ("tiny", "hub", a folder) of each spec.

    Raises:
        UserError: unavailable weights (checked for every entry before any model loads),
            or weights from an entry's source whose output width differs from the entry's.
    """
    resolved = [resolve_weights(spec, value) for spec, value in zip(specs, weights, strict=True)]
    groups: dict[str, list[int]] = {}
    for index, (spec, source) in enumerate(zip(specs, resolved, strict=True)):
        groups.setdefault(checkpoint_key(spec, source), []).append(index)
    encoders: list[Encoder | None] = [None] * len(specs)
    for indices in groups.values():
        members = [(ENCODER_CLASSES[specs[index].loader], specs[index]) for index in indices]
        loaded = load_sharing(members, resolved[indices[0]], device, dtype)
        for index, encoder in zip(indices, loaded, strict=True):
            _check_width(encoder)
            encoders[index] = encoder
    return encoders


def _check_width(encoder: Encoder) -> None:
    spec = encoder.spec
    if encoder.weights.kind == "hub" and spec.width and encoder.width != spec.width:
        raise UserError(
            f"{spec.source} gives {encoder.width}-d vectors but {spec.where} says "
            f"{spec.width}: correct its width"
        )


def load_encoder(
    spec: EncoderSpec, weights: str, device: torch.device, dtype: torch.dtype
) -> Encoder:
    """Load the encoder `spec` describes from --weights `weights` ("tiny", "hub", a folder).

    Raises:
        UserError: unavailable weights, or weights from the entry's source whose output
            width differs from the entry's.
    """
    (encoder,) = load_encoders([spec], [weights], device, dtype)
    return encoder
