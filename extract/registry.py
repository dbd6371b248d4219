"""The encoder registry: a name maps to an EncoderSpec, read from a JSON or YAML entry.

Built-in entries are the files extract/model_configs/NAME.json, one per encoder (open_clip's
model_configs); NAME is the file's stem. A user file (`--registry my_encoders.yaml`, or the
`registry` key of an extract section in params.yaml) adds entries with the same keys, one
per top-level name:

    my-bert:
      source: /models/chinese-bert   # a local Hugging Face folder (or a hub id)
      modality: text
      pooling: mean

`loader` defaults by modality (text: encoder-text, image: encoder-image), `width` is read
from the weights when absent, and `tiny_config` is only needed for `--weights tiny`.

A broken entry never breaks the others: it is kept with its one-line error, which is raised
only when that entry is asked for (and shown by `python -m extract --list`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
MODALITIES = ("image", "text", "pair")  # pair: one vector per image-report pair (ViLT)


@dataclass(frozen=True)
class Loader:
    """What a loader (the code that runs an encoder) can encode, and how it pools."""

    modalities: tuple[str, ...]  # the modalities an entry with this loader may declare
    poolings: dict[str, str]  # pooling name -> what it means
    summary: str  # one line for --list and the README
    # Loaders of one family read one kind of checkpoint with one forward (see
    # checkpoint_key): in a pass, entries of a family that load the same weights share one
    # loaded model, and each forward of it. "": a family of its own (the loader's name).
    family: str = ""


LOADERS: dict[str, Loader] = {
    "blip2-qformer": Loader(
        ("image",),
        {
            "mean": "mean over the Q-Former's 32 query outputs",
            "first": "query output 0 (what Blip2QFormerModel calls its pooler output)",
        },
        "BLIP-2 ViT + Q-Former of a BLIP-2 checkpoint (the language model is not loaded)",
        family="blip2-image",
    ),
    "blip2-vit": Loader(
        ("image",),
        {
            "cls": "the ViT's pooled output (class token after the final layer norm), as "
            "Blip2Model.get_image_features returns it",
            "mean": "mean over the ViT's patch tokens (class token left out)",
        },
        "BLIP-2's ViT alone, without the Q-Former (the paper's M3 ablation)",
        family="blip2-image",
    ),
    "blip2-text": Loader(
        ("text",),
        {
            "projection": "the Q-Former's [CLS] output through BLIP-2's text projection, "
            "L2-normalised as BLIP-2 does (its image-text contrastive text feature)",
            "cls": "the Q-Former's [CLS] output, before the projection",
            "mean": "mean over the Q-Former's outputs of all real tokens ([CLS]/[SEP] too)",
        },
        "BLIP-2's text side: the Q-Former run on the text alone (Blip2TextModelWithProjection)",
    ),
    "decoder-text": Loader(
        ("text",),
        {
            "mean": "mean over the report's tokens: padding and the special tokens the "
            "tokenizer adds (the begin-of-text token) are left out",
            "last": "each row's last real token",
            "prompt": "the report inside a fixed template (preprocessing.prompt_template); "
            "the state of the template's last token",
        },
        "any decoder LLM that AutoModel loads (LLaMA, Qwen, Mistral, ...)",
    ),
    "encoder-text": Loader(
        ("text",),
        {
            "mean": "mean over all real tokens, [CLS] and [SEP] included (as "
            "sentence-transformers' mean pooling)",
            "cls": "the [CLS] token's last hidden state (not the NSP pooler)",
        },
        "any BERT-style text encoder that AutoModel loads (BERT, RoBERTa, ...)",
    ),
    "encoder-image": Loader(
        ("image",),
        {
            "cls": "the class token's last hidden state (token 0)",
            "mean": "mean over the patch tokens (class token left out, as timm's avg pool)",
        },
        "any ViT-style image encoder that AutoModel loads (ViT, DeiT, DINOv2, ...)",
    ),
    "dual-encoder": Loader(
        ("image", "text"),
        {
            "projection": "the model's own embedding in the joint image-text space "
            "(get_image_features / get_text_features), not L2-normalised",
        },
        "one tower of a CLIP-style dual encoder (CLIP, ALIGN, Chinese-CLIP, ...)",
    ),
    "vilt": Loader(
        ("pair",),
        {
            "pooler": "ViLT's pooler output: the [CLS] state through its dense + tanh "
            "layer (what its image-text matching head reads)",
            "cls": "the [CLS] token's last hidden state",
        },
        "ViLT, one vector per image-report pair",
    ),
}
DEFAULT_LOADERS = {"image": "encoder-image", "text": "encoder-text"}
PATCH_TOKEN_KEYS = ("blocks", "prefix_tokens")  # see EncoderSpec.patch_tokens


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is: where its weights come from and how one item becomes one vector."""

    name: str  # registry name; for built-in entries the JSON file's stem
    modality: str  # what one item is: "image", "text" or "pair" (an image with its report)
    source: str  # hub id of the real weights, or (user entries) a local checkpoint folder
    pooling: str  # how per-token outputs become one vector: a key of its loader's poolings
    loader: str = ""  # a key of LOADERS; "" picks DEFAULT_LOADERS[modality]
    width: int = 0  # output width with the real weights; 0: read from the weights
    # image: image_size, mean, std, interpolation, resize, crop_size; text: max_length (tokens),
    # long_reports (truncate, or windows with window_overlap tokens: see extract.encoders) and
    # for decoder LLMs prompt_template. Empty: read from the checkpoint folder (images) or the
    # model's limits (text).
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    tiny_config: Mapping[str, Any] = field(default_factory=dict)  # small config (with model_type)
    tiny_tokenizer: str = ""  # offline tokenizer folder for tiny weights (in MODEL_CONFIGS)
    # Where Grad-CAM (python -m extract.explain) finds an image encoder's patch tokens:
    # "blocks", the dotted path (from the loaded model) of its transformer blocks (a
    # ModuleList), and "prefix_tokens", how many class/register tokens come before the
    # grid of patches. The map is taken at the last block's input, the tokens that block
    # mixes: a class-token pooling reads no patch of the last block's output. Empty: no
    # patch tokens (a CNN such as ALIGN's EfficientNet, or a pair model), which explain refuses.
    patch_tokens: Mapping[str, Any] = field(default_factory=dict)
    # The most items one forward takes; a larger batch of the pass runs in chunks of this
    # size, whose vectors are joined (0: the whole batch). A CNN's full-resolution
    # activations for a whole batch outgrow the CPU's caches: see align-image.json.
    forward_batch: int = 0
    notes: str = ""  # why this source, width or preprocessing was chosen
    origin: str = field(default="", compare=False)  # the file the entry was read from

    def __post_init__(self) -> None:
        if not self.loader and self.modality in DEFAULT_LOADERS:
            object.__setattr__(self, "loader", DEFAULT_LOADERS[self.modality])
        checks = (
            ("modality", self.modality in MODALITIES, f"one of {', '.join(MODALITIES)}"),
            ("loader", self.loader in LOADERS, f"one of {', '.join(LOADERS)}"),
        )
        for key, valid, expected in checks:
            if not valid:
                raise UserError(
                    f"{self.where}, key '{key}': {getattr(self, key)!r} is not {expected}"
                )
        loader = LOADERS[self.loader]
        if self.modality not in loader.modalities:
            raise UserError(
                f"{self.where}, key 'modality': loader {self.loader} encodes "
                f"{' or '.join(loader.modalities)}, not {self.modality}"
            )
        if self.pooling not in loader.poolings:
            raise UserError(
                f"{self.where}, key 'pooling': '{self.pooling}' is not one of "
                f"{', '.join(loader.poolings)} for {self.loader} encoders"
            )
        for key in ("width", "forward_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(
                    f"{self.where}, key '{key}': expected a whole number, got {value!r}"
                )
        for key in ("preprocessing", "tiny_config"):
            if not isinstance(getattr(self, key), Mapping):
                raise UserError(f"{self.where}, key '{key}': expected a mapping of settings")
        if self.tiny_config and "model_type" not in self.tiny_config:
            raise UserError(f"{self.where}, key 'tiny_config': needs a model_type (e.g. \"bert\")")
        self._check_patch_tokens()

    def _check_patch_tokens(self) -> None:
        if not self.patch_tokens:
            return
        where = f"{self.where}, key 'patch_tokens'"
        if self.modality != "image":
            raise UserError(f"{where}: only image encoders have patch tokens")
        if not isinstance(self.patch_tokens, Mapping) or set(self.patch_tokens) - set(
            PATCH_TOKEN_KEYS
        ):
            raise UserError(f"{where}: expected a mapping with keys {', '.join(PATCH_TOKEN_KEYS)}")
        blocks, prefix = self.patch_tokens.get("blocks"), self.patch_tokens.get("prefix_tokens", 1)
        if not isinstance(blocks, str) or not blocks:
            raise UserError(f"{where}: 'blocks' must name the model's transformer blocks")
        if not isinstance(prefix, int) or prefix < 0:
            raise UserError(f"{where}: 'prefix_tokens' must be a whole number, got {prefix!r}")

    @property
    def where(self) -> str:
        """The entry and its file, for messages."""
        return f"{self.origin or 'code'}, encoder '{self.name}'"

    @property
    def pooling_meaning(self) -> str:
        """What this entry's pooling computes."""
        return LOADERS[self.loader].poolings[self.pooling]

    @property
    def tiny_tokenizer_folder(self) -> Path:
        """The offline tokenizer that tiny text weights use: beside the entry's file if such a
        folder is there, else in extract/model_configs/."""
        beside = Path(self.origin).parent / self.tiny_tokenizer if self.origin else None
        if beside is not None and self.tiny_tokenizer and beside.is_dir():
            return beside
        return MODEL_CONFIGS / self.tiny_tokenizer


_SPEC_KEYS = tuple(spec_field.name for spec_field in fields(EncoderSpec))
ENTRY_KEYS = tuple(key for key in _SPEC_KEYS if key not in ("name", "origin"))
REQUIRED_KEYS = ("modality", "source", "pooling")


def spec_from_dict(name: str, entry: Any, origin: str) -> EncoderSpec:
    """Make a spec from a JSON (or YAML) entry, rejecting unknown and missing keys.

    Raises:
        UserError: one line naming `origin`, the entry and the key at fault.
    """
    where = f"{origin}, encoder '{name}'"
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: expected a mapping of keys ({', '.join(ENTRY_KEYS)})")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
            f"valid keys are {', '.join(ENTRY_KEYS)}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    return EncoderSpec(name=name, origin=origin, **entry)


def _local_source(source: Any, base: Path) -> Any:
    """A user entry's source as an absolute folder when it names one (relative paths are
    taken from the entry file's folder); hub ids stay as they are."""
    if not isinstance(source, str) or not source:
        return source
    path = Path(source).expanduser()
    if path.is_absolute():
        return str(path)
    if (base / path).is_dir() or source.startswith(("./", "../")):
        return str((base / path).resolve())
    return source


@dataclass(frozen=True)
class Registry:
    """Usable entries by name, broken ones with the one-line error they raise, and entries
    ignored because their name was taken (the first keeps it)."""

    specs: Mapping[str, EncoderSpec]
    broken: Mapping[str, str]  # name -> error message
    ignored: tuple[str, ...] = ()  # one message per entry whose name was already registered
    user_file: str = ""  # the user file whose entries were added, if any

    def names(self) -> list[str]:
        """Every entry's name, usable or broken, sorted."""
        return sorted({*self.specs, *self.broken})

    def get(self, name: str) -> EncoderSpec:
        """The spec registered as `name`.

        Raises:
            UserError: a broken entry's own error, or for an unknown name the available
                names and how to add one.
        """
        if name in self.broken:
            raise UserError(self.broken[name])
        if name not in self.specs:
            raise UserError(
                f"unknown encoder '{name}'; available: {', '.join(sorted(self.specs))}. To add "
                f"one, write it into a YAML file passed with --registry (see README: 'your own "
                f"encoder'), or drop NAME.json into {MODEL_CONFIGS}"
            )
        return self.specs[name]


def _read_entries(path: Path) -> Mapping[str, Any]:
    """The entries of a registry file: {name: entry}; a built-in JSON file is one entry."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (OSError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{path}: cannot be read as YAML or JSON ({reason})") from None
    if path.parent == MODEL_CONFIGS and path.suffix == ".json":
        return {path.stem: content}
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise UserError(f"{path}: expected encoder names as top-level keys, each with its entry")
    return content


def _add_entries(
    path: Path,
    specs: dict[str, EncoderSpec],
    broken: dict[str, str],
    ignored: list[str],
    local_sources: bool,
) -> None:
    for name, entry in _read_entries(path).items():
        name = str(name)
        if name in specs or name in broken:
            first = specs[name].origin if name in specs else "an entry that is broken"
            ignored.append(
                f"{path}, encoder '{name}': ignored, the name is registered twice (first by "
                f"{first}, which keeps it); give this entry another name"
            )
            continue
        try:
            if local_sources and isinstance(entry, Mapping) and "source" in entry:
                entry = {**entry, "source": _local_source(entry["source"], path.parent)}
            specs[name] = spec_from_dict(name, entry, str(path))
        except UserError as error:
            broken[name] = str(error)
        except TypeError as error:  # a value of the wrong kind, e.g. a list as width
            broken[name] = f"{path}, encoder '{name}': {error}"


@cache
def _built_in() -> Registry:
    specs: dict[str, EncoderSpec] = {}
    broken: dict[str, str] = {}
    for path in sorted(MODEL_CONFIGS.glob("*.json")):
        try:
            _add_entries(path, specs, broken, [], local_sources=False)
        except UserError as error:
            broken[path.stem] = str(error)
    return Registry(specs, broken)


def load_registry(user_file: str | Path = "") -> Registry:
    """The built-in entries, plus those of `user_file` when given.

    Raises:
        UserError: `user_file` does not exist or is not a mapping of entries (one entry's
            problem only marks that entry broken).
    """
    built_in = _built_in()
    if not user_file:
        return built_in
    path = Path(user_file).expanduser()
    if not path.is_file():
        raise UserError(f"--registry {user_file}: file does not exist")
    specs, broken, ignored = dict(built_in.specs), dict(built_in.broken), []
    _add_entries(path, specs, broken, ignored, local_sources=True)
    return Registry(specs, broken, tuple(ignored), str(path))


def available_encoders() -> list[str]:
    """The usable built-in encoder names, sorted."""
    return sorted(_built_in().specs)


def get_spec(name: str, user_file: str | Path = "") -> EncoderSpec:
    """The spec registered as `name`, among the built-in entries and those of `user_file`."""
    return load_registry(user_file).get(name)


def describe(registry: Registry) -> str:
    """The table `python -m extract --list` prints: one line per entry, broken ones too."""
    header = ("name", "modality", "loader", "pooling", "width", "source", "from")
    rows = [header]
    for name in registry.names():
        if name in registry.specs:
            spec = registry.specs[name]
            rows.append(
                (
                    name,
                    spec.modality,
                    spec.loader,
                    spec.pooling,
                    str(spec.width) if spec.width else "from weights",
                    spec.source,
                    _short_origin(spec.origin),
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines += [f"{name}  BROKEN: {registry.broken[name]}" for name in sorted(registry.broken)]
    lines += [f"IGNORED: {problem}" for problem in registry.ignored]
    return "\n".join(lines)


def _short_origin(origin: str) -> str:
    path = Path(origin)
    return "built-in" if path.parent == MODEL_CONFIGS else origin


def built_in_entry(name: str) -> dict[str, Any]:
    """The JSON entry of a built-in encoder, as a dict (for tests and user files to copy)."""
    return json.loads((MODEL_CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
