"""The encoder registry: a name maps to an EncoderSpec, read from a JSON file.

Each file extract/model_configs/NAME.json describes the encoder NAME (open_clip's
model_configs). The JSON keys are EncoderSpec's fields except `name`, which is the file's
stem. Adding another decoder LLM as a text encoder is one such file with
`"loader": "decoder-text"`; no code changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
POOLINGS = {
    "image": ("mean", "first"),  # over the Q-Former's query outputs, or query token 0
    "text": ("mean", "last"),  # over the attention mask, or each row's last real token
}


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is: where its weights come from and how one item becomes one vector."""

    name: str  # registry name; for built-in entries the JSON file's stem
    modality: str  # what one item is: "image" or "text"
    source: str  # hub id of the real weights
    loader: str  # the code that loads and runs it: a key of extract.encoders.LOADERS
    pooling: str  # how per-token outputs become one vector: one of POOLINGS[modality]
    width: int  # output width with the real weights
    # image: image_size, mean, std, interpolation; text: max_length (tokens)
    preprocessing: Mapping[str, Any]
    tiny_config: Mapping[str, Any]  # a small config of the same architecture (with model_type)
    tiny_tokenizer: str = ""  # text: offline tokenizer folder for tiny weights, in MODEL_CONFIGS
    origin: str = field(default="", compare=False)  # where the entry was read from, for messages

    def __post_init__(self) -> None:
        where = f"encoder '{self.name}' ({self.origin or 'registered in code'})"
        if self.modality not in POOLINGS:
            raise UserError(f"{where}: modality '{self.modality}' is not one of {list(POOLINGS)}")
        if self.pooling not in POOLINGS[self.modality]:
            raise UserError(
                f"{where}: pooling '{self.pooling}' is not one of "
                f"{list(POOLINGS[self.modality])} for {self.modality} encoders"
            )
        if "model_type" not in self.tiny_config:
            raise UserError(f'{where}: tiny_config needs a model_type (e.g. "llama")')

    @property
    def tiny_tokenizer_folder(self) -> Path:
        """The folder of the offline tokenizer that tiny text weights use."""
        return MODEL_CONFIGS / self.tiny_tokenizer


_SPEC_KEYS = tuple(spec_field.name for spec_field in fields(EncoderSpec))
_ENTRY_KEYS = tuple(key for key in _SPEC_KEYS if key not in ("name", "origin"))
_REGISTRY: dict[str, EncoderSpec] = {}


def spec_from_dict(name: str, entry: Mapping[str, Any], origin: str) -> EncoderSpec:
    """Make a spec from a JSON (or YAML) entry, rejecting unknown and missing keys.

    Raises:
        UserError: naming `origin` and the keys at fault.
    """
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise UserError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys are {', '.join(_ENTRY_KEYS)}"
        )
    try:
        return EncoderSpec(name=name, origin=origin, **entry)
    except TypeError as error:  # a required field is absent
        raise UserError(f"{origin}: {error}") from None


def load_spec_file(path: Path) -> EncoderSpec:
    """Read one extract/model_configs/NAME.json file."""
    return spec_from_dict(path.stem, json.loads(path.read_text(encoding="utf-8")), str(path))


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add `spec` to the registry; a name may be registered only once."""
    if spec.name in _REGISTRY:
        raise UserError(
            f"encoder '{spec.name}' is registered twice: by {_REGISTRY[spec.name].origin} "
            f"and by {spec.origin or 'code'}; give one of them another name"
        )
    _REGISTRY[spec.name] = spec
    return spec


def available_encoders() -> list[str]:
    """The registered encoder names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """The spec registered as `name`.

    Raises:
        UserError: listing the available names and how to add one.
    """
    if name not in _REGISTRY:
        raise UserError(
            f"unknown encoder '{name}'; available: {', '.join(available_encoders())}. "
            f"To add one, drop NAME.json into {MODEL_CONFIGS} (copy llama3.json for "
            "another decoder LLM)"
        )
    return _REGISTRY[name]


for _path in sorted(MODEL_CONFIGS.glob("*.json")):
    register(load_spec_file(_path))
