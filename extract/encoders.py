"""Frozen encoders behind one contract: a batch in, a float32 tensor [N, width] out.

`load_encoder(spec, weights, device, dtype)` builds the model an EncoderSpec names from
one of three weight sources:

- "tiny": the spec's small config of the same architecture classes, with seeded random
  weights (the same vectors on every run) and, for text, the tokenizer shipped in
  extract/model_configs/. Offline; for tests and demos.
- "hub": `from_pretrained` on the spec's hub id, from the local Hugging Face cache only:
  this stage never downloads, so an uncached model fails at once instead of after retries.
- a folder: `from_pretrained` on a downloaded checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn
from torch.nn import init
from transformers import (
    CONFIG_MAPPING,
    MODEL_MAPPING,
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2Config,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)

from extract.registry import EncoderSpec
from pipeline.errors import UserError

TINY_SEED = 0  # tiny weights are a function of the config and this seed only
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FINGERPRINT_METHODS = {
    "tiny": "sha256 over every parameter's name, dtype, shape and bytes",
    "folder": "sha256 over every file's relative path, size and bytes "
    "(only the first and last MiB of files over 2 MiB)",
}
_FINGERPRINT_CHUNK = 1 << 20


@dataclass(frozen=True)
class Weights:
    """Where an encoder's weights come from."""

    kind: str  # "tiny", "hub" or "folder"
    folder: Path | None  # the checkpoint folder; for "hub" the snapshot in the local cache


def resolve_weights(spec: EncoderSpec, weights: str) -> Weights:
    """Turn the --weights value ("tiny", "hub" or a folder) into a weight source.

    Raises:
        UserError: "hub" when the model is not in the local cache, or a folder that does
            not exist; the message says how to point at a downloaded folder.
    """
    if weights == "tiny":
        return Weights("tiny", None)
    if weights == "hub":
        try:
            folder = snapshot_download(spec.source, local_files_only=True)
        except LocalEntryNotFoundError:
            raise UserError(
                f"--weights hub: {spec.source} (encoder {spec.name}) is not in the local "
                f"Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and this stage never "
                f"downloads. Download it where there is network (hf download {spec.source} "
                "--local-dir DIR), then pass --weights /path/to/downloaded/folder; or use "
                "--weights tiny for an offline test run"
            ) from None
        return Weights("hub", Path(folder))
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"--weights {weights}: expected 'tiny', 'hub' or an existing folder holding a "
            f"downloaded checkpoint of {spec.source}"
        )
    return Weights("folder", folder)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype called `name`; half precision only on a GPU.

    Raises:
        UserError: an unknown name, or half precision on a CPU.
    """
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    if name != "float32" and device.type != "cuda":
        raise UserError(f"--dtype {name} needs a GPU; this run is on {device}: use float32")
    return DTYPES[name]


def pool(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token outputs [N, tokens, width] -> one float32 vector per row [N, width].

    Args:
        hidden: the encoder's last hidden states.
        pooling: "mean" over real tokens, "first" token, or "last" real token of each row.
        mask: [N, tokens], 1 for real tokens, 0 for padding; None means all real.
    """
    hidden = hidden.float()
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "last":
        # The highest position whose mask is 1: right for right and left padding alike.
        positions = torch.arange(mask.shape[1], device=mask.device)
        last_real = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real]
    raise ValueError(f"unknown pooling {pooling!r}")


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
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state


def parameters_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of `model`: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """A cheap but content-based sha256 of a checkpoint folder (see FINGERPRINT_METHODS)."""
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            if size <= 2 * _FINGERPRINT_CHUNK:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_FINGERPRINT_CHUNK))
                handle.seek(size - _FINGERPRINT_CHUNK)
                digest.update(handle.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def _place(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Move to `device` in `dtype`, keeping in float32 what the architecture keeps there
    (BLIP-2's Q-Former), as `from_pretrained` does."""
    model.to(device=device, dtype=dtype)
    keep = set(model._keep_in_fp32_modules or ())
    for name, parameter in model.named_parameters():
        if keep & set(name.split(".")):
            parameter.data = parameter.data.float()
    return model


def _model_config(spec: EncoderSpec, weights: Weights) -> PretrainedConfig:
    if weights.kind == "tiny":
        return AutoConfig.for_model(**spec.tiny_config)
    try:
        config = AutoConfig.from_pretrained(weights.folder, local_files_only=True)
    except OSError as error:
        raise UserError(
            f"{weights.folder} is not a Hugging Face checkpoint folder: {error}"
        ) from None
    expected_type = spec.tiny_config["model_type"]
    if config.model_type != expected_type:
        raise UserError(
            f"{weights.folder} holds a '{config.model_type}' checkpoint; encoder {spec.name} "
            f"needs a '{expected_type}' one ({spec.source})"
        )
    return config


def _load_model(
    model_class: type[PreTrainedModel],
    spec: EncoderSpec,
    weights: Weights,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[PreTrainedModel, str]:
    """The model in eval mode on `device`, and its weights' fingerprint."""
    config = _model_config(spec, weights)
    if weights.kind == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = model_class(config)
        fingerprint = parameters_fingerprint(model)
        return _place(model, device, dtype).eval(), fingerprint
    try:
        model, loading_info = model_class.from_pretrained(
            weights.folder,
            config=config,
            dtype=dtype,
            device_map={"": device},
            local_files_only=True,
            output_loading_info=True,
        )
    except OSError as error:
        raise UserError(f"cannot load {spec.name} from {weights.folder}: {error}") from None
    if loading_info["missing_keys"]:
        # from_pretrained would fill them with random values: features would be noise.
        missing = sorted(loading_info["missing_keys"])
        raise UserError(
            f"{weights.folder} lacks {len(missing)} weight(s) of {spec.name}, e.g. {missing[0]}; "
            f"is it a complete checkpoint of {spec.source}?"
        )
    return model.eval(), folder_fingerprint(weights.folder)


class Encoder(ABC):
    """A frozen encoder ready to run: `encode(batch)` returns float32 [N, width]."""

    def __init__(
        self, spec: EncoderSpec, model: PreTrainedModel, weights: Weights, fingerprint: str
    ) -> None:
        self.spec = spec
        self.model = model
        self.weights = weights
        self.weights_fingerprint = fingerprint
        self.device = model.device

    @classmethod
    def load(
        cls, spec: EncoderSpec, weights: Weights, device: torch.device, dtype: torch.dtype
    ) -> Encoder:
        """Build or load the model of `spec` from `weights` onto `device`."""
        model, fingerprint = _load_model(cls.model_class(spec), spec, weights, device, dtype)
        return cls(spec, model, weights, fingerprint)

    @staticmethod
    @abstractmethod
    def model_class(spec: EncoderSpec) -> type[PreTrainedModel]:
        """The transformers class that holds this encoder's weights."""

    @property
    @abstractmethod
    def width(self) -> int:
        """The length of one output vector with these weights."""

    @abstractmethod
    def encode(self, batch: Any) -> torch.Tensor:
        """One batch of inputs -> float32 [N, width] on the encoder's device."""

    def provenance(self) -> dict[str, Any]:
        """What identifies this encoder's outputs, beyond the spec."""
        method = "tiny" if self.weights.kind == "tiny" else "folder"
        return {
            "weights_fingerprint": self.weights_fingerprint,
            "weights_fingerprint_method": FINGERPRINT_METHODS[method],
            "model_config": json.loads(self.model.config.to_json_string(use_diff=False)),
            "width": self.width,
        }


class Blip2QFormerEncoder(Encoder):
    """Images -> BLIP-2 Q-Former query outputs, pooled over the queries."""

    @staticmethod
    def model_class(spec: EncoderSpec) -> type[PreTrainedModel]:
        return Blip2ImageQFormer

    @property
    def width(self) -> int:
        return self.model.config.qformer_config.hidden_size

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [N, 3, size, size] -> [N, Q-Former hidden size]."""
        vision_dtype = self.model.vision_model.dtype
        queries = self.model(batch.to(self.device, dtype=vision_dtype))
        return pool(queries, self.spec.pooling)


def _load_tokenizer(spec: EncoderSpec, weights: Weights) -> PreTrainedTokenizerBase:
    folder = spec.tiny_tokenizer_folder if weights.kind == "tiny" else weights.folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(
            f"{folder} holds no tokenizer that AutoTokenizer can load; copy the tokenizer "
            f"files of {spec.source} (tokenizer.json, tokenizer_config.json, ...) there"
        ) from None
    if tokenizer.pad_token is None:
        # LLaMA has no pad token; which one pads is irrelevant as the mask hides it.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class DecoderTextEncoder(Encoder):
    """Texts -> a decoder LLM's last hidden states, pooled over the real tokens.

    Any decoder that AutoModel loads (LLaMA, Qwen, Mistral, ...) fits: a new one is a JSON
    file in extract/model_configs/ with "loader": "decoder-text".
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: PreTrainedModel,
        weights: Weights,
        fingerprint: str,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__(spec, model, weights, fingerprint)
        self.tokenizer = tokenizer
        self.max_length = int(spec.preprocessing["max_length"])

    @classmethod
    def load(
        cls, spec: EncoderSpec, weights: Weights, device: torch.device, dtype: torch.dtype
    ) -> DecoderTextEncoder:
        """Load the tokenizer (first: it is cheap, a missing one fails fast), then the model."""
        tokenizer = _load_tokenizer(spec, weights)
        model, fingerprint = _load_model(cls.model_class(spec), spec, weights, device, dtype)
        return cls(spec, model, weights, fingerprint, tokenizer)

    @staticmethod
    def model_class(spec: EncoderSpec) -> type[PreTrainedModel]:
        # The base model without its LM head: from_pretrained on a *ForCausalLM
        # checkpoint keeps the transformer and skips the head.
        return MODEL_MAPPING[CONFIG_MAPPING[spec.tiny_config["model_type"]]]

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def encode(self, batch: Sequence[str]) -> torch.Tensor:
        """Texts -> [N, hidden size], truncated to the spec's max_length tokens."""
        tokens = self.tokenizer(
            list(batch),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=mask, use_cache=False
        ).last_hidden_state
        return pool(hidden, self.spec.pooling, mask)

    def provenance(self) -> dict[str, Any]:
        backend_json = self.tokenizer.backend_tokenizer.to_str()
        return {
            **super().provenance(),
            "tokenizer": {
                "vocab_size": len(self.tokenizer),
                "pad_token": self.tokenizer.pad_token,
                "padding_side": self.tokenizer.padding_side,
                "sha256": hashlib.sha256(backend_json.encode()).hexdigest(),
            },
        }


LOADERS: dict[str, type[Encoder]] = {
    "blip2-qformer": Blip2QFormerEncoder,
    "decoder-text": DecoderTextEncoder,
}


def load_encoder(
    spec: EncoderSpec, weights: str, device: torch.device, dtype: torch.dtype
) -> Encoder:
    """Load the encoder `spec` describes from --weights `weights` ("tiny", "hub", a folder).

    Raises:
        UserError: an unknown loader, unavailable weights, or hub weights whose output
            width differs from the registered one.
    """
    if spec.loader not in LOADERS:
        raise UserError(
            f"encoder {spec.name} ({spec.origin}): unknown loader '{spec.loader}'; "
            f"known loaders: {', '.join(LOADERS)}"
        )
    encoder = LOADERS[spec.loader].load(spec, resolve_weights(spec, weights), device, dtype)
    if encoder.weights.kind == "hub" and encoder.width != spec.width:
        raise UserError(
            f"{spec.source} gives {encoder.width}-d vectors but {spec.origin} says "
            f"{spec.width}: correct its width"
        )
    return encoder
