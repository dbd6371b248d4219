"""Frozen encoders behind one contract: a batch in, a float32 tensor [N, width] out.

This module holds what every encoder shares: where weights come from, how a model is built
or loaded and fingerprinted, tokenizers, pooling, and the Encoder base class. The encoders
themselves are in extract.blip2 and extract.auto_encoders; extract.loaders maps a spec's
loader to one and loads it.

Weights come from one of three sources:

- "tiny": the spec's small config of the same architecture classes, with seeded random
  weights (the same vectors on every run) and, for text, the tokenizer shipped in
  extract/model_configs/. Offline; for tests and demos.
- "hub": the entry's source: `from_pretrained` on its hub id, from the local Hugging Face
  cache only (this stage never downloads, so an uncached model fails at once instead of
  after retries); for a user entry that names a folder, that folder.
- a folder: `from_pretrained` on a downloaded checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.modeling_utils import PreTrainedModel

from extract.preprocess import preprocessing_from_folder
from extract.registry import EncoderSpec
from pipeline.errors import UserError

TINY_SEED = 0  # tiny weights are a function of the config and this seed only
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FINGERPRINT_METHODS = {
    "tiny": "sha256 over every parameter's name, dtype, shape and bytes",
    "folder": "sha256 over every file's relative path, size and bytes "
    "(only the first and last MiB of files over 2 MiB)",
}
DEFAULT_MAX_LENGTH = 512  # tokens, when neither the entry nor the model sets a lower limit
# preprocessing.long_reports: what happens to a text longer than max_length tokens.
# "truncate" keeps its first max_length tokens (what the models were trained with);
# "windows" encodes it in overlapping windows of max_length tokens and pools them (only
# encoders whose pooling is a mean over tokens offer it: see Encoder.supports_windows).
LONG_REPORTS = ("truncate", "windows")
_FINGERPRINT_CHUNK = 1 << 20
_NO_LIMIT = 1_000_000  # tokenizers without a length limit report a huge model_max_length
# Convolutions that make a model a CNN (ALIGN's EfficientNet), which runs in channels-last
# memory: a ViT has one, its patch embedding. On a CPU, oneDNN then convolves without
# reordering every activation (ALIGN's tiny image tower: half the time).
CNN_CONVOLUTIONS = 2


@dataclass(frozen=True)
class Weights:
    """Where an encoder's weights come from."""

    kind: str  # "tiny", "hub" (the entry's source) or "folder" (--weights FOLDER)
    folder: Path | None  # the checkpoint folder; for "hub" the snapshot or the entry's folder


def resolve_weights(spec: EncoderSpec, weights: str) -> Weights:
    """Turn the --weights value ("tiny", "hub" or a folder) into a weight source.

    Raises:
        UserError: tiny weights for an entry without a tiny config; "hub" when the model is
            not in the local cache (or the entry's folder is absent); a folder that does not
            exist. Each message says what to pass instead.
    """
    if weights == "tiny":
        if not spec.tiny_config:
            raise UserError(
                f"{spec.where} has no tiny_config, which --weights tiny needs: pass "
                f"--weights hub to load its source ({spec.source}) or --weights FOLDER, or "
                "add a tiny_config (a small config of the same architecture) to the entry"
            )
        return Weights("tiny", None)
    if weights == "hub":
        if Path(spec.source).is_absolute():  # a user entry naming a local folder
            if not Path(spec.source).is_dir():
                raise UserError(f"{spec.where}: source folder {spec.source} does not exist")
            return Weights("hub", Path(spec.source))
        try:
            folder = snapshot_download(spec.source, local_files_only=True)
        except (LocalEntryNotFoundError, HFValidationError):
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
    """The torch dtype called `name`; float16 only on a GPU.

    bfloat16 runs on a CPU too: CPUs with AVX-512 BF16 or AMX multiply in it several times
    faster than in float32 (bench/extract_cpu.py measures both).

    Raises:
        UserError: an unknown name, or float16 on a CPU.
    """
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    if name == "float16" and device.type != "cuda":
        raise UserError(
            f"--dtype {name} needs a GPU; this run is on {device}: use float32 or bfloat16"
        )
    return DTYPES[name]


def attention_implementation(model_class: type[PreTrainedModel]) -> str:
    """PyTorch's fused scaled-dot-product attention where the architecture supports it
    (BLIP-2, LLaMA, CLIP, BERT, ...), else transformers' eager attention (ALIGN, ViLT).

    Recorded in the provenance: the two agree only up to rounding.
    """
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def pool(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token outputs [N, tokens, width] -> one float32 vector per row [N, width].

    Args:
        hidden: the encoder's last hidden states.
        pooling: "mean" over the tokens the mask keeps, "first" token, or "last" kept token
            of each row.
        mask: [N, tokens], 1 for tokens to pool, 0 for padding (and anything else left
            out); None keeps all.
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


def parameters_fingerprint(model: nn.Module, names: Collection[str] | None = None) -> str:
    """sha256 over every parameter and buffer of `model` (or only those called `names`):
    names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if names is not None and name not in names:
            continue
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


def place(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Move to `device` in `dtype`, keeping in float32 what the architecture keeps there
    (BLIP-2's Q-Former), as `from_pretrained` does."""
    model.to(device=device, dtype=dtype)
    keep = set(model._keep_in_fp32_modules or ())
    for name, parameter in model.named_parameters():
        if keep & set(name.split(".")):
            parameter.data = parameter.data.float()
    return model


def model_config(spec: EncoderSpec, weights: Weights) -> PretrainedConfig:
    """The architecture's config: the spec's tiny config, or the checkpoint folder's.

    Raises:
        UserError: the folder holds no config, or one of another architecture than the
            entry's tiny config names.
    """
    if weights.kind == "tiny":
        return AutoConfig.for_model(**spec.tiny_config)
    try:
        config = AutoConfig.from_pretrained(weights.folder, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(
            f"{weights.folder} is not a Hugging Face checkpoint folder: {reason}"
        ) from None
    expected_type = spec.tiny_config.get("model_type")
    if expected_type and config.model_type != expected_type:
        raise UserError(
            f"{weights.folder} holds a '{config.model_type}' checkpoint; encoder {spec.name} "
            f"needs a '{expected_type}' one ({spec.source})"
        )
    return config


def auto_model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The base model class (no task head) AutoModel picks for `config`.

    Raises:
        UserError: transformers has no base model for this architecture.
    """
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise UserError(
            f"transformers {transformers.__version__} has no model for "
            f"'{config.model_type}' checkpoints"
        ) from None


def _tokenizer(spec: EncoderSpec, weights: Weights) -> PreTrainedTokenizerBase:
    """The entry's tokenizer: the tiny one for tiny weights, else the checkpoint folder's,
    padding on the right."""
    if weights.kind == "tiny" and not spec.tiny_tokenizer:
        raise UserError(
            f"{spec.where}: key 'tiny_tokenizer' is needed for --weights tiny: name a "
            "tokenizer folder (e.g. tiny-bert-zh-tokenizer, shipped in extract/model_configs)"
        )
    folder = spec.tiny_tokenizer_folder if weights.kind == "tiny" else weights.folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise UserError(
            f"{folder} holds no tokenizer that AutoTokenizer can load; copy the tokenizer "
            f"files of {spec.source} (tokenizer.json, tokenizer_config.json, ...) there"
        ) from None
    if tokenizer.pad_token is None:
        # LLaMA has no pad token; which one pads is irrelevant as the mask hides it.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _max_positions(config: PretrainedConfig) -> int | None:
    """The longest token sequence the model's (text) position embeddings allow, if stated."""
    for part in (
        config,
        *(getattr(config, name, None) for name in ("text_config", "qformer_config")),
    ):
        positions = getattr(part, "max_position_embeddings", None)
        if isinstance(positions, int):
            return positions
    return None


class Encoder(ABC):
    """A frozen encoder ready to run: `encode(batch)` returns float32 [N, width].

    Subclasses say which model class holds the weights and how a batch becomes vectors.
    Encoders of texts and pairs get the entry's tokenizer and `tokenize`.
    """

    # Weights the encoder never uses (regular expressions), which a checkpoint may lack
    # without making its vectors noise: e.g. BERT's NSP pooler in a masked-LM checkpoint.
    unused_weights: tuple[str, ...] = ()
    l2_normalised = False  # whether encode() returns unit vectors

    def __init__(
        self,
        spec: EncoderSpec,
        model: PreTrainedModel,
        weights: Weights,
        fingerprint: str,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.weights = weights
        self.weights_fingerprint = fingerprint
        self.device = model.device
        self.tokenizer = tokenizer
        convolutions = sum(isinstance(module, nn.Conv2d) for module in model.modules())
        self.channels_last = spec.modality != "text" and convolutions >= CNN_CONVOLUTIONS
        if self.channels_last:  # the model may be shared: converting it again changes nothing
            model.to(memory_format=torch.channels_last)
        self.preprocessing = self._resolve_preprocessing()
        # Texts longer than max_length tokens met by encode() so far, by what was done to them
        # (see run_record): cut to max_length, or encoded in windows.
        self.truncated_reports = 0
        self.windowed_reports = 0

    @classmethod
    def load(
        cls, spec: EncoderSpec, weights: Weights, device: torch.device, dtype: torch.dtype
    ) -> Encoder:
        """Build or load the model of `spec` from `weights` onto `device` (the tokenizer
        first: it is cheap, and a missing one fails fast)."""
        (encoder,) = load_sharing([(cls, spec)], weights, device, dtype)
        return encoder

    @classmethod
    def _load_model(
        cls,
        model_class: type[PreTrainedModel],
        config: PretrainedConfig,
        spec: EncoderSpec,
        weights: Weights,
        device: torch.device,
        dtype: torch.dtype,
        parts: Sequence[Collection[str] | None] = (None,),
    ) -> tuple[PreTrainedModel, list[str]]:
        """The model in eval mode on `device`, and a fingerprint of its weights for each of
        `parts` (parameter names; None: all of them)."""
        attention = attention_implementation(model_class)
        if weights.kind == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_SEED)
                model = model_class._from_config(config, attn_implementation=attention)
            fingerprints = [parameters_fingerprint(model, names) for names in parts]
            return place(model, device, dtype).eval(), fingerprints
        try:
            model, loading_info = model_class.from_pretrained(
                weights.folder,
                config=config,
                dtype=dtype,
                attn_implementation=attention,
                device_map={"": device},
                local_files_only=True,
                output_loading_info=True,
            )
        except OSError as error:
            raise UserError(f"cannot load {spec.name} from {weights.folder}: {error}") from None
        missing = sorted(
            key
            for key in loading_info["missing_keys"]
            if not any(re.search(pattern, key) for pattern in cls.unused_weights)
        )
        if missing:
            # from_pretrained would fill them with random values: features would be noise.
            raise UserError(
                f"{weights.folder} lacks {len(missing)} weight(s) of {spec.name}, e.g. "
                f"{missing[0]}; is it a complete checkpoint of {spec.source}?"
            )
        return model.eval(), [folder_fingerprint(weights.folder)] * len(parts)

    @staticmethod
    @abstractmethod
    def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
        """The transformers class that holds this encoder's weights."""

    @property
    @abstractmethod
    def width(self) -> int:
        """The length of one output vector with these weights."""

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """One batch of inputs -> the model's outputs that pooling reads.

        The costly part, split from pooling so that one forward serves every encoder of a
        pass that runs the same loaded model with the same forward_key (several poolings of
        one checkpoint; BLIP-2's Q-Former and its ViT's pooled output).
        """

    @abstractmethod
    def pool_outputs(self, outputs: Any) -> torch.Tensor:
        """forward's outputs -> float32 [N, width] on the encoder's device."""

    def encode(self, batch: Any) -> torch.Tensor:
        """One batch of inputs -> float32 [N, width] on the encoder's device."""
        return self.pool_outputs(self.forward(batch))

    def forward_key(self) -> str:
        """What forward reads besides the model: encoders that run one loaded model and have
        equal keys get equal outputs from a forward, so one serves them all."""
        return json.dumps(
            {
                "preprocessing": self.preprocessing,
                "inputs": self.forward_inputs(),
                "forward_batch": self.spec.forward_batch,
            },
            sort_keys=True,
            default=str,
        )

    def forward_inputs(self) -> str:
        """How forward prepares a batch beyond the preprocessing settings (overridden by an
        encoder whose pooling changes its tokens: prompt pooling)."""
        return "as preprocessed"

    @property
    def max_length(self) -> int:
        """Tokens kept per text: the entry's max_length, else the model's own limit (at most
        DEFAULT_MAX_LENGTH)."""
        if "max_length" in self.spec.preprocessing:
            return int(self.spec.preprocessing["max_length"])
        limits = [DEFAULT_MAX_LENGTH, _max_positions(self.model.config)]
        if self.tokenizer is not None:
            limits.append(self.tokenizer.model_max_length)
        return min(limit for limit in limits if isinstance(limit, int) and 0 < limit < _NO_LIMIT)

    @property
    def supports_windows(self) -> bool:
        """Whether long_reports: windows is open to this encoder: its pooling must be a mean
        over tokens, so that the windows' vectors pool into the text's (see Encoder.encode
        of the subclasses that offer it)."""
        return False

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes before truncation, special tokens included: the length of
        the row encode() builds for it, when that is at most max_length."""
        encoded = self.tokenizer(list(texts), verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def _count_long(self, lengths: Sequence[int]) -> int:
        """Count the texts over max_length (as truncated or windowed, by long_reports)."""
        long = sum(length > self.max_length for length in lengths)
        if self.preprocessing.get("long_reports") == "windows":
            self.windowed_reports += long
        else:
            self.truncated_reports += long
        return long

    def run_record(self) -> dict[str, Any]:
        """What happened to long texts in this process's encode() calls so far (counts of a
        shard under several processes: sum them over processes)."""
        return {
            "max_length": self.max_length,
            "long_reports": self.preprocessing.get("long_reports"),
            "truncated_reports": self.truncated_reports,
            "windowed_reports": self.windowed_reports,
        }

    def tokenize(self, texts: Sequence[str], **options: Any) -> BatchEncoding:
        """Texts -> padded token ids and attention mask on the encoder's device, truncated to
        max_length tokens (counted in truncated_reports)."""
        self._count_long(self.token_lengths(texts))
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            **options,
        )
        return tokens.to(self.device)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images on the encoder's device, in the dtype of its first weights."""
        dtype = next(self.model.parameters()).dtype
        if self.channels_last:
            return images.to(self.device, dtype=dtype, memory_format=torch.channels_last)
        return images.to(self.device, dtype=dtype)

    def _resolve_preprocessing(self) -> dict[str, Any]:
        """The entry's preprocessing; for images an entry may leave it out, and it is then
        read from the checkpoint folder's preprocessor_config.json."""
        settings = dict(self.spec.preprocessing)
        if self.spec.modality in ("image", "pair") and "image_size" not in settings:
            if self.weights.folder is None:
                raise UserError(
                    f"{self.spec.where}: key 'preprocessing' needs image_size, mean and std "
                    "for --weights tiny (with real weights they are read from the checkpoint)"
                )
            settings = {**preprocessing_from_folder(self.weights.folder), **settings}
        if self.tokenizer is not None:
            settings.setdefault("max_length", self.max_length)
            self._resolve_long_reports(settings)
        return settings

    def _resolve_long_reports(self, settings: dict[str, Any]) -> None:
        """Check long_reports (default truncate) and, for windows, window_overlap: tokens of
        left context each window after the first repeats from the one before, without
        pooling them again (default a quarter of max_length)."""
        mode = settings.setdefault("long_reports", "truncate")
        if mode not in LONG_REPORTS:
            raise UserError(
                f"{self.spec.where}, key 'preprocessing.long_reports': expected one of "
                f"{', '.join(LONG_REPORTS)}, got {mode!r}"
            )
        if mode == "truncate":
            return
        if not self.supports_windows:
            raise UserError(
                f"{self.spec.where}, key 'preprocessing.long_reports': windows needs a mean "
                f"pooling of a decoder-text entry; {self.spec.loader} with pooling "
                f"'{self.spec.pooling}' only truncates"
            )
        overlap = settings.setdefault("window_overlap", settings["max_length"] // 4)
        if not isinstance(overlap, int) or not 0 <= overlap < settings["max_length"] // 2:
            raise UserError(
                f"{self.spec.where}, key 'preprocessing.window_overlap': expected a whole "
                f"number of tokens from 0 to under half of max_length, got {overlap!r}"
            )

    def pooled(self) -> str:
        """Which outputs were pooled, and how (recorded in the provenance)."""
        return self.spec.pooling_meaning

    def provenance(self) -> dict[str, Any]:
        """What identifies this encoder's outputs, beyond the spec."""
        method = "tiny" if self.weights.kind == "tiny" else "folder"
        provenance = {
            "weights_fingerprint": self.weights_fingerprint,
            "weights_fingerprint_method": FINGERPRINT_METHODS[method],
            "model_config": json.loads(self.model.config.to_json_string(use_diff=False)),
            "attention": self.model.config._attn_implementation,
            "width": self.width,
            "pooled": self.pooled(),
            "l2_normalised": self.l2_normalised,
            # only where it applies, so that other encoders keep their identity
            **({"memory_format": "channels_last"} if self.channels_last else {}),
            **({"forward_batch": self.spec.forward_batch} if self.spec.forward_batch else {}),
            "preprocessing": self.preprocessing,
        }
        if self.tokenizer is not None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            serialised = (
                backend.to_str() if backend is not None else str(self.tokenizer.get_vocab())
            )
            provenance["tokenizer"] = {
                "vocab_size": len(self.tokenizer),
                "pad_token": self.tokenizer.pad_token,
                "padding_side": self.tokenizer.padding_side,
                "sha256": hashlib.sha256(serialised.encode()).hexdigest(),
            }
        return provenance


def _parameter_names(model_class: type[PreTrainedModel], config: PretrainedConfig) -> set[str]:
    """The names of the parameters and buffers a model of `model_class` has (built without
    memory, on the meta device)."""
    with torch.device("meta"):
        return set(model_class._from_config(copy.deepcopy(config)).state_dict())


def load_sharing(
    members: Sequence[tuple[type[Encoder], EncoderSpec]],
    weights: Weights,
    device: torch.device,
    dtype: torch.dtype,
) -> list[Encoder]:
    """Encoders of one checkpoint, on one loaded model: entries whose loaders are of one
    family (extract.registry) loading the same weights (see extract.loaders).

    The model loaded is the members' model class that holds every other member's
    parameters (BLIP-2's ViT + Q-Former holds the ViT alone); each member's fingerprint is
    of its own parameters, as if it had been loaded alone.

    Args:
        members: (encoder class, entry) per encoder, in the order returned.

    Raises:
        UserError: as for Encoder.load.
        ValueError: no member's model holds the others' (a registry family of loaders
            that do not share a checkpoint).
    """
    first = members[0][1]
    texts = any(spec.modality in ("text", "pair") for _, spec in members)
    tokenizer = _tokenizer(first, weights) if texts else None
    config = model_config(first, weights)
    classes = [encoder_class.model_class(config) for encoder_class, _ in members]
    lead = 0
    names: dict[type[PreTrainedModel], set[str] | None] = {classes[0]: None}
    if len(set(classes)) > 1:
        names = {model_class: _parameter_names(model_class, config) for model_class in classes}
        covering = [
            index
            for index, model_class in enumerate(classes)
            if all(names[model_class] >= held for held in names.values())
        ]
        if not covering:
            raise ValueError(f"no model of {[spec.name for _, spec in members]} holds the others")
        lead = covering[0]
    lead_class, lead_spec = members[lead]
    model, fingerprints = lead_class._load_model(
        classes[lead],
        config,
        lead_spec,
        weights,
        device,
        dtype,
        [names[model_class] for model_class in classes],
    )
    return [
        encoder_class(spec, model, weights, fingerprint, tokenizer)
        for (encoder_class, spec), fingerprint in zip(members, fingerprints, strict=True)
    ]


def probe_width(encoder: Encoder, batch: Any) -> int:
    """The output width of `encoder`, found by encoding one small `batch`."""
    with torch.inference_mode():
        return int(encoder.encode(batch).shape[-1])


def joint_embedding(output: Any) -> torch.Tensor:
    """What get_image_features / get_text_features return: in transformers 5.x an output
    whose pooler_output is the embedding, in 4.x the embedding itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
