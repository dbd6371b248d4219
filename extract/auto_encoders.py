"""Encoders for whole families of checkpoints that transformers' Auto classes load.

A user entry with one of these loaders needs no code: a decoder LLM (decoder-text), a
BERT-style text encoder (encoder-text), a ViT-style image encoder (encoder-image), one tower
of a CLIP-style dual encoder (dual-encoder), or ViLT (vilt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding, PretrainedConfig
from transformers.modeling_utils import PreTrainedModel

from extract.encoders import Encoder, auto_model_class, joint_embedding, pool, probe_width
from pipeline.errors import UserError

# PromptEOL (Jiang et al., 2023): the report inside a template that asks for one word, so
# the last token's state must summarise the report. In Chinese, as the reports are.
DEFAULT_PROMPT_TEMPLATE = "这份喉镜报告：“{report}”用一个词概括是：“"
PAIR_SEED = 0  # ViLT draws a random order of its image patches on every forward pass


class AutoModelEncoder(Encoder):
    """An encoder whose weights are the base model (no task head) AutoModel picks."""

    @staticmethod
    def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
        # from_pretrained on a *ForCausalLM / *ForMaskedLM checkpoint keeps the base model
        # and skips the head.
        return auto_model_class(config)


@dataclass(frozen=True)
class DecoderOutputs:
    """One forward of a decoder LLM over a batch of texts."""

    tokens: Mapping[str, torch.Tensor]  # input_ids, attention_mask and the pooling's masks
    hidden: torch.Tensor  # last hidden states [rows, tokens, width]
    text_of_row: torch.Tensor | None  # with windows: the text each row is a window of
    texts: int  # texts in the batch


class DecoderTextEncoder(AutoModelEncoder):
    """Texts -> a decoder LLM's last hidden states, pooled over the report's tokens.

    Any decoder that AutoModel loads (LLaMA, Qwen, Mistral, ...) fits: a new one is an entry
    with "loader": "decoder-text".
    """

    def _resolve_preprocessing(self) -> dict[str, Any]:
        settings = super()._resolve_preprocessing()
        if self.spec.pooling == "prompt":
            template = settings.setdefault("prompt_template", DEFAULT_PROMPT_TEMPLATE)
            if not isinstance(template, str) or template.count("{report}") != 1:
                raise UserError(
                    f"{self.spec.where}, key 'preprocessing.prompt_template': must contain "
                    f"{{report}} exactly once, got {template!r}"
                )
        return settings

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def supports_windows(self) -> bool:
        return self.spec.pooling == "mean"

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        if self.spec.pooling != "prompt":
            return super().token_lengths(texts)
        template = sum(map(len, self._template_tokens()))
        reports = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [template + len(ids) for ids in reports["input_ids"]]

    def _template_tokens(self) -> tuple[list[int], list[int], list[int]]:
        """The ids around a report in prompt pooling: leading special tokens, the template's
        prefix and its suffix, each part tokenised alone."""
        prefix, suffix = self.preprocessing["prompt_template"].split("{report}")
        leading, _ = self._added_special_tokens()
        return (
            leading,
            self.tokenizer(prefix, add_special_tokens=False)["input_ids"],
            self.tokenizer(suffix, add_special_tokens=False)["input_ids"],
        )

    def _added_special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text (LLaMA-3: <|begin_of_text|>)."""
        plain = self.tokenizer("声", add_special_tokens=False)["input_ids"]
        wrapped = self.tokenizer("声")["input_ids"]
        start = next(
            index
            for index in range(len(wrapped) - len(plain) + 1)
            if wrapped[index : index + len(plain)] == plain
        )
        return wrapped[:start], wrapped[start + len(plain) :]

    def _prompt_tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """[leading special tokens] + template prefix + report + template suffix, right
        padded; only the report is truncated, so every row ends with the template's end."""
        leading, prefix_ids, suffix_ids = self._template_tokens()
        budget = self.max_length - len(leading) - len(prefix_ids) - len(suffix_ids)
        if budget < 1:
            raise UserError(
                f"{self.spec.where}: the prompt template alone fills max_length "
                f"({self.max_length} tokens); raise preprocessing.max_length"
            )
        reports = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        self._count_long([len(ids) + self.max_length - budget for ids in reports])
        rows = [leading + prefix_ids + ids[:budget] + suffix_ids for ids in reports]
        return self._right_padded(rows)

    def _right_padded(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Rows of token ids -> input_ids and attention_mask, right padded, on the device."""
        input_ids = torch.full(
            (len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long
        )
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _windows(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each text as windows of at most max_length tokens: the leading special tokens,
        then a stretch of the text. Consecutive stretches share window_overlap tokens, which
        the later window reads as context but does not pool.

        Returns:
            the model inputs (one row per window) with "pooled_mask" (1 on the tokens the
            window contributes to its text's mean), and the text index of each row.
        """
        leading, trailing = self._added_special_tokens()
        budget = self.max_length - len(leading) - len(trailing)  # text tokens per window
        overlap = self.preprocessing["window_overlap"]
        step = budget - overlap
        reports = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        self._count_long([len(ids) + len(leading) + len(trailing) for ids in reports])
        rows, text_of_row, pooled_from = [], [], []
        for text, ids in enumerate(reports):
            for start in range(0, max(len(ids) - budget, 0) + step, step):
                rows.append(leading + ids[start : start + budget] + trailing)
                text_of_row.append(text)
                pooled_from.append(len(leading) + (overlap if start else 0))
        tokens = self._right_padded(rows)
        positions = torch.arange(tokens["input_ids"].shape[1], device=self.device)
        ends = torch.tensor([len(row) - len(trailing) for row in rows], device=self.device)
        starts = torch.tensor(pooled_from, device=self.device)
        tokens["pooled_mask"] = (
            (positions >= starts[:, None]) & (positions < ends[:, None])
        ).long()
        return tokens, torch.tensor(text_of_row, device=self.device)

    def forward_inputs(self) -> str:
        # The prompt template around each report makes other tokens than the other poolings'.
        return "in the prompt template" if self.spec.pooling == "prompt" else "as tokenised"

    def forward(self, batch: Sequence[str]) -> DecoderOutputs:
        """Texts -> their token rows (the prompt's, with long_reports: windows each text's
        windows) and the model's last hidden states."""
        text_of_row = None
        if self.preprocessing["long_reports"] == "windows":
            tokens, text_of_row = self._windows(batch)
        elif self.spec.pooling == "prompt":
            tokens = self._prompt_tokens(batch)
        else:
            tokens = self.tokenize(batch, return_special_tokens_mask=True)
        hidden = self.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            use_cache=False,
        ).last_hidden_state
        return DecoderOutputs(tokens, hidden, text_of_row, len(batch))

    def pool_outputs(self, outputs: DecoderOutputs) -> torch.Tensor:
        """-> [N, hidden size], truncated to max_length tokens, or with long_reports:
        windows, the mean over every token of the text (each pooled in one window)."""
        tokens = outputs.tokens
        if outputs.text_of_row is not None:
            return self._pool_windows(outputs)
        pooled_mask = tokens["attention_mask"]
        if self.spec.pooling == "mean":
            # The begin-of-text state is the same for every report and, in LLaMA, huge.
            pooled_mask = pooled_mask * (1 - tokens["special_tokens_mask"])
        return pool(
            outputs.hidden,
            "last" if self.spec.pooling == "prompt" else self.spec.pooling,
            pooled_mask,
        )

    @staticmethod
    def _pool_windows(outputs: DecoderOutputs) -> torch.Tensor:
        """The mean of each text's window means, weighted by the tokens each pools: the mean
        over all its tokens, each read with up to max_length tokens of context."""
        hidden = outputs.hidden.float()
        weights = outputs.tokens["pooled_mask"].unsqueeze(-1).float()
        sums = torch.zeros(outputs.texts, hidden.shape[-1], device=hidden.device)
        sums.index_add_(0, outputs.text_of_row, (hidden * weights).sum(dim=1))
        counts = torch.zeros(outputs.texts, device=hidden.device)
        counts.index_add_(0, outputs.text_of_row, weights.sum(dim=(1, 2)))
        return sums / counts.clamp(min=1).unsqueeze(-1)

    def pooled(self) -> str:
        leading, trailing = self._added_special_tokens()
        added = self.tokenizer.convert_ids_to_tokens(leading + trailing)
        if self.spec.pooling == "mean":
            return (
                "mean of the last hidden states over the report's own tokens; left out: "
                f"padding and the special tokens the tokenizer adds ({', '.join(added) or 'none'})"
            )
        if self.spec.pooling == "last":
            return (
                "last hidden state of each row's last real token (padding left out; the "
                f"tokenizer adds {', '.join(added) or 'no special tokens'})"
            )
        return (
            "last hidden state of the prompt's last token: tokens are "
            f"[{', '.join(self.tokenizer.convert_ids_to_tokens(leading)) or 'none'}] + "
            "template prefix + report (only it truncated) + template suffix, each part "
            "tokenised alone; template in preprocessing.prompt_template"
        )


class EncoderTextEncoder(AutoModelEncoder):
    """Texts -> a BERT-style encoder's last hidden states, mean or [CLS] pooled."""

    unused_weights = (r"^pooler\.",)  # the NSP pooler; absent from masked-LM checkpoints

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, batch: Sequence[str]) -> tuple[BatchEncoding, torch.Tensor]:
        """Texts, truncated to max_length tokens -> their tokens and last hidden states."""
        tokens = self.tokenize(batch)
        hidden = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
        return tokens, hidden

    def pool_outputs(self, outputs: tuple[BatchEncoding, torch.Tensor]) -> torch.Tensor:
        """-> [N, hidden size]."""
        tokens, hidden = outputs
        return pool(
            hidden, "first" if self.spec.pooling == "cls" else "mean", tokens["attention_mask"]
        )


class EncoderImageEncoder(AutoModelEncoder):
    """Images -> a ViT-style encoder's last hidden states: class token or mean of patches."""

    unused_weights = (r"^pooler\.",)  # e.g. ViT's pooler, absent from classifier checkpoints

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [N, 3, size, size] -> last hidden states."""
        return self.model(pixel_values=self.pixels(batch)).last_hidden_state

    def pool_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """-> [N, hidden size]."""
        hidden = outputs
        if hidden.ndim != 3:
            raise UserError(
                f"{self.spec.where}: the encoder-image loader needs token outputs "
                f"[N, tokens, width] (ViT-style); this model gives shape {tuple(hidden.shape)}"
            )
        if self.spec.pooling == "cls":
            return hidden[:, 0].float()
        return pool(hidden[:, 1:], "mean")


class DualEncoder(AutoModelEncoder):
    """One tower of a CLIP-style dual encoder: images or texts -> the joint-space embedding.

    The whole model is loaded (both towers), as the checkpoints store it; only the entry's
    modality runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Output widths differ by family (ALIGN's image side has no projection): measure.
        if self.spec.modality == "image":
            side = int(self.preprocessing.get("crop_size") or self.preprocessing["image_size"])
            self._width = probe_width(self, torch.zeros(1, 3, side, side))
        else:
            self._width = probe_width(self, ["声"])

    @property
    def width(self) -> int:
        return self._width

    def forward(self, batch: Any) -> torch.Tensor:
        """Preprocessed images [N, 3, size, size] or texts -> the joint-space embeddings."""
        if self.spec.modality == "image":
            output = self.model.get_image_features(pixel_values=self.pixels(batch))
        else:
            tokens = self.tokenize(batch)
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        return joint_embedding(output)

    def pool_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """-> [N, embedding width]."""
        return outputs.float()


class ViltEncoder(AutoModelEncoder):
    """(image, report) pairs -> one ViLT vector per pair."""

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, batch: tuple[torch.Tensor, Sequence[str]]) -> Any:
        """(preprocessed images [N, 3, size, size], N reports) -> ViLT's outputs."""
        images, texts = batch
        tokens = self.tokenize(texts)
        pixel_values = self.pixels(images)
        pixel_mask = torch.ones(
            (pixel_values.shape[0], *pixel_values.shape[2:]), dtype=torch.long, device=self.device
        )
        # ViLT shuffles its patches (with their position embeddings) on each pass: the
        # result is order-free up to rounding, and seeded so reruns give the same bits.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PAIR_SEED)
            outputs = self.model(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                pixel_values=pixel_values,
                pixel_mask=pixel_mask,
            )
        return outputs

    def pool_outputs(self, outputs: Any) -> torch.Tensor:
        """-> [N, hidden size]."""
        if self.spec.pooling == "pooler":
            return outputs.pooler_output.float()
        return outputs.last_hidden_state[:, 0].float()
