"""BLIP-2 encoders: the Q-Former image vector, the ViT alone (M3), and the text side.

Each loads only the parts of a BLIP-2 checkpoint it runs: the attribute names are those of
transformers' BLIP-2 classes, so `from_pretrained` on a full checkpoint fills them and
skips the rest (the OPT language model, above all). In one pass, blip2-qformer and
blip2-vit of one checkpoint load the ViT + Q-Former model once, and one forward of it
gives both vectors (Blip2ImageEncoder.forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import init
from transformers import BatchEncoding, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2Config,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2TextModelWithProjection,
    Blip2VisionModel,
)

from extract.encoders import Encoder, pool


class Blip2ImageQFormer(Blip2PreTrainedModel):
    """BLIP-2's vision tower, query tokens and Q-Former, without the language model.

    The attribute names are those of Blip2ForConditionalGeneration, so `from_pretrained`
    on a full BLIP-2 checkpoint (e.g. Salesforce/blip2-opt-2.7b) fills these parts and
    skips the OPT weights.
    """

    config: Blip2Config
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keep_in_fp32_modules = ["query_tokens", "qformer"]  # as BLIP-2 itself does
    _keys_to_ignore_on_load_unexpected = [r"^language_model\.", r"^language_projection\."]

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            # BLIP-2 starts its query tokens at zero, which makes all 32 queries equal in a
            # random (tiny) model; trained checkpoints overwrite them anyway.
            init.trunc_normal_(module.query_tokens, std=self.config.initializer_range)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> Q-Former query outputs [N, queries, hidden]."""
        return self.query_outputs(self.vision_model(pixel_values=pixel_values).last_hidden_state)

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The ViT's last hidden states [N, tokens, width] -> the Q-Former's query outputs."""
        image_mask = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state


class Blip2ImageVit(Blip2PreTrainedModel):
    """BLIP-2's vision tower alone (the ViT whose outputs the Q-Former reads)."""

    config: Blip2Config
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = [
        r"^language_model\.",
        r"^language_projection\.",
        r"^qformer\.",
        r"^query_tokens",
    ]

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        """Images [N, 3, H, W] -> the ViT's last hidden states and pooled output."""
        return self.vision_model(pixel_values=pixel_values)


@dataclass(frozen=True)
class Blip2ImageOutputs:
    """One forward of BLIP-2's image side: the ViT's outputs and, when the loaded model
    has the Q-Former, its query outputs."""

    vision: BaseModelOutputWithPooling
    queries: torch.Tensor | None


class Blip2ImageEncoder(Encoder):
    """What both BLIP-2 image encoders share: one forward of the ViT (and the Q-Former,
    when the loaded model has it), so that in a pass of both, the ViT runs once per batch
    (their loaders are one family in the registry: they load one model)."""

    def forward(self, batch: torch.Tensor) -> Blip2ImageOutputs:
        """Preprocessed images [N, 3, size, size] -> the ViT's (and Q-Former's) outputs."""
        vision = self.model.vision_model(
            pixel_values=batch.to(self.device, dtype=self.model.vision_model.dtype)
        )
        queries = None
        if isinstance(self.model, Blip2ImageQFormer):
            queries = self.model.query_outputs(vision.last_hidden_state)
        return Blip2ImageOutputs(vision, queries)


class Blip2QFormerEncoder(Blip2ImageEncoder):
    """Images -> BLIP-2 Q-Former query outputs, pooled over the queries."""

    @staticmethod
    def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
        return Blip2ImageQFormer

    @property
    def width(self) -> int:
        return self.model.config.qformer_config.hidden_size

    def pool_outputs(self, outputs: Blip2ImageOutputs) -> torch.Tensor:
        """-> [N, Q-Former hidden size]."""
        return pool(outputs.queries, self.spec.pooling)


class Blip2VitEncoder(Blip2ImageEncoder):
    """Images -> BLIP-2's ViT output without the Q-Former (the paper's M3 ablation)."""

    @staticmethod
    def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
        return Blip2ImageVit

    @property
    def width(self) -> int:
        return self.model.config.vision_config.hidden_size

    def pool_outputs(self, outputs: Blip2ImageOutputs) -> torch.Tensor:
        """-> [N, ViT hidden size]."""
        if self.spec.pooling == "cls":
            return outputs.vision.pooler_output.float()
        return pool(outputs.vision.last_hidden_state[:, 1:], "mean")


class Blip2TextEncoder(Encoder):
    """Texts -> BLIP-2's Q-Former text features (the text side of its contrastive task).

    Only BLIP-2 checkpoints trained for retrieval carry the Q-Former's word embeddings and
    text projection (Salesforce/blip2-itm-vit-g); the captioning ones (blip2-opt-*) do not.
    """

    @property
    def l2_normalised(self) -> bool:  # BLIP-2 normalises its projected text feature
        return self.spec.pooling == "projection"

    @staticmethod
    def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
        return Blip2TextModelWithProjection

    @property
    def width(self) -> int:
        if self.spec.pooling == "projection":
            return self.model.config.image_text_hidden_size
        return self.model.config.qformer_config.hidden_size

    def forward(self, batch: Sequence[str]) -> tuple[BatchEncoding, Any]:
        """Texts -> their tokens and the model's outputs."""
        tokens = self.tokenize(batch)
        outputs = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return tokens, outputs

    def pool_outputs(self, outputs: tuple[BatchEncoding, Any]) -> torch.Tensor:
        """-> [N, 256] projected features, or [N, Q-Former hidden size]."""
        tokens, outputs = outputs
        if self.spec.pooling == "projection":
            return outputs.text_embeds[:, 0].float()
        if self.spec.pooling == "cls":
            return outputs.last_hidden_state[:, 0].float()
        return pool(outputs.last_hidden_state, "mean", tokens["attention_mask"])
