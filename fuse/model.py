"""Classifier heads on frozen-encoder vectors: VLMF-Net's, and a plain MLP for baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fuse.fused_update import addmm_into_slots


class Dense(nn.Module):
    """A fully connected layer, y = x @ weight + bias, with `weight` stored [in, out].

    The same function and initialisation as nn.Linear (uniform within 1/sqrt(in)); only
    the layout differs: under CPU bfloat16 autocast, nn.Linear's [out, in] weight makes its
    gradient come back transposed, and converting that to float32 costs more than the
    layer's matrix products; stored [in, out], the gradient is contiguous.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.out_features = out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [N, in] -> [N, out]."""
        if hasattr(self.weight, "gradient_slot"):
            return addmm_into_slots(self.bias, inputs, self.weight)
        return torch.addmm(self.bias, inputs, self.weight)


class Dropout(nn.Module):
    """nn.Dropout with the same masks from the same generator, drawn about twice as fast on
    a CPU.

    ATen's CPU dropout draws each element's bernoulli(1 - p) one by one, as a float64
    uniform below 1 - p; torch.rand in float64 draws the same uniforms in the same order
    through a faster loop (a 64 x 512 mask: 266 against 138 us on a 2-core AMX Xeon). The
    outputs and gradients are bit-equal to nn.Dropout's (tests/fuse/test_dropout.py).
    Elsewhere than on a CPU it is nn.Dropout's own kernel.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs, each element zeroed with probability p and the rest scaled by 1/(1-p)
        (in training; unchanged in eval)."""
        if not self.training or self.p == 0:
            return inputs
        if inputs.device.type != "cpu" or self.p == 1:
            return F.dropout(inputs, self.p, training=True)
        keep = 1 - self.p
        uniforms = torch.rand(inputs.shape, dtype=torch.float64)
        noise = (uniforms < keep).to(inputs.dtype).div_(keep)
        return inputs * noise


class FusionHead(nn.Module):
    """Inputs -> (optional projector + L2-normalisation each) -> concatenation -> MLP.

    With projections this is VLMF-Net's head: the vision projector f_vp (-> 512) and the
    text projector f_tp (-> 2048), each output L2-normalised, concatenated, and an MLP
    with ReLU and dropout. With exactly two projected inputs besides the `unpaired` ones,
    two small linear maps take those projections to one shared width for the NT-Xent loss
    (the projections' widths differ). Without projections the inputs go straight into the
    MLP: the frozen-feature head used for baselines.

    Args:
        input_widths: width of each input, in the order `forward` receives them.
        projections: output width of each input's projector; empty for no projectors.
        hidden_widths: the MLP's hidden widths.
        dropout: dropout probability after each hidden layer.
        num_classes: output logits.
        contrastive_width: shared width for NT-Xent; 0 for no contrastive embeddings.
        unpaired: projected inputs fused but left out of NT-Xent (clinical variables: the
            loss pairs an image with its report).
    """

    def __init__(
        self,
        *,
        input_widths: Mapping[str, int],
        projections: Mapping[str, int],
        hidden_widths: Sequence[int],
        dropout: float,
        num_classes: int,
        contrastive_width: int,
        unpaired: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.input_names = tuple(input_widths)
        self.projectors = nn.ModuleDict(
            {name: Dense(input_widths[name], projections[name]) for name in projections}
        )
        if self.projectors and set(self.projectors) != set(self.input_names):
            raise ValueError(f"projections {sorted(projections)} must cover {self.input_names}")
        fused_width = sum(
            projections[name] if self.projectors else input_widths[name]
            for name in self.input_names
        )
        layers: list[nn.Module] = []
        for width in hidden_widths:
            layers += [Dense(fused_width, width), nn.ReLU(), Dropout(dropout)]
            fused_width = width
        layers.append(Dense(fused_width, num_classes))
        self.classifier = nn.Sequential(*layers)
        paired = [name for name in self.input_names if name in projections and name not in unpaired]
        contrastive = contrastive_width > 0 and len(paired) == 2
        self.contrastive = nn.ModuleDict(
            {
                name: Dense(projections[name], contrastive_width)
                for name in (paired if contrastive else ())
            }
        )

    def fused_parts(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What the classifier reads, one part per input: each input's L2-normalised
        projection (VLMF-Net), or the input itself (the baseline head); concatenated in
        `forward`, and split by input for attributions."""
        if not self.projectors:
            return list(inputs)
        return [
            F.normalize(self.projectors[name](vectors), dim=-1)
            for name, vectors in zip(self.input_names, inputs, strict=True)
        ]

    def variant_logits(
        self,
        inputs: Sequence[torch.Tensor],
        absent: Sequence[torch.Tensor],
        variants: Sequence[Sequence[bool]],
    ) -> list[torch.Tensor]:
        """Class logits of every variant, an input not used in it replaced by its `absent`
        vector: forward(inputs with absent ones) for each, with each input's projection and
        its product with the first classifier layer computed once for all variants.

        The first layer reads the concatenated parts, so its output is the sum of each
        part's product with that part's rows of the weight: a variant only chooses, per
        input, between the rows' product and the absent vector's (one row).
        """
        parts = self.fused_parts(inputs)
        absent_parts = self.fused_parts(
            [vector[None].to(x.dtype) for vector, x in zip(absent, inputs, strict=True)]
        )
        first, rest = self.classifier[0], self.classifier[1:]
        weights = first.weight.split([part.shape[-1] for part in parts])
        present = [(part @ weight).float() for part, weight in zip(parts, weights, strict=True)]
        missing = [
            (part @ weight).float() for part, weight in zip(absent_parts, weights, strict=True)
        ]
        logits = []
        for used in variants:
            hidden = first.bias.float() + sum(
                row if keep else stand_in
                for row, stand_in, keep in zip(present, missing, used, strict=True)
            )
            logits.append(rest(hidden))
        return logits

    def forward(
        self, inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Class logits, and the contrastive embeddings of the two inputs when there are any."""
        parts = self.fused_parts(inputs)
        logits = self.classifier(torch.cat(parts, dim=-1))
        if not self.contrastive:
            return logits, None
        embeddings = tuple(
            self.contrastive[name](vectors)
            for name, vectors in zip(self.input_names, parts, strict=True)
            if name in self.contrastive
        )
        return logits, embeddings
