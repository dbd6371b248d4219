"""The VLMF-Net head: projectors, L2-normalisation, concatenation and an MLP classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

MODALITY_SETS = {
    "fusion": ("image", "text"),  # M4: image + report
    "image": ("image",),  # M1: image only
    "report": ("text",),  # M2: report only
}


class VLMFHead(nn.Module):
    """Trainable part of VLMF-Net on top of frozen-encoder vectors.

    Each used modality is projected (image -> image_projection, text -> text_projection),
    L2-normalised and concatenated; an MLP with ReLU and dropout gives class logits.
    With both modalities, small heads map the two projections to one shared width for
    the contrastive loss (the projections' widths differ, 512 vs 2048).
    """

    def __init__(
        self,
        *,
        variant: str,
        image_width: int,
        text_width: int,
        image_projection: int,
        text_projection: int,
        hidden_widths: Sequence[int],
        dropout: float,
        num_classes: int,
        contrastive_width: int,
    ) -> None:
        super().__init__()
        if variant not in MODALITY_SETS:
            raise ValueError(f"unknown variant {variant!r}; choose from {sorted(MODALITY_SETS)}")
        self.variant = variant
        self.modalities = MODALITY_SETS[variant]
        self.image_projector = (
            nn.Linear(image_width, image_projection) if "image" in self.modalities else None
        )
        self.text_projector = (
            nn.Linear(text_width, text_projection) if "text" in self.modalities else None
        )
        fused_width = (image_projection if self.image_projector else 0) + (
            text_projection if self.text_projector else 0
        )
        layers: list[nn.Module] = []
        for width in hidden_widths:
            layers += [nn.Linear(fused_width, width), nn.ReLU(), nn.Dropout(dropout)]
            fused_width = width
        layers.append(nn.Linear(fused_width, num_classes))
        self.classifier = nn.Sequential(*layers)
        both = len(self.modalities) == 2
        self.image_contrastive = nn.Linear(image_projection, contrastive_width) if both else None
        self.text_contrastive = nn.Linear(text_projection, contrastive_width) if both else None

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Class logits, and the two contrastive embeddings when both modalities are used."""
        parts = []
        image_z = text_z = None
        if self.image_projector is not None:
            image_z = F.normalize(self.image_projector(image), dim=-1)
            parts.append(image_z)
        if self.text_projector is not None:
            text_z = F.normalize(self.text_projector(text), dim=-1)
            parts.append(text_z)
        logits = self.classifier(torch.cat(parts, dim=-1))
        if self.image_contrastive is None:
            return logits, None
        return logits, (self.image_contrastive(image_z), self.text_contrastive(text_z))
