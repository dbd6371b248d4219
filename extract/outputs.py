"""What a pass writes: per --model its registry entry, pooling, weights and feature file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from extract.config import ExtractConfig
from extract.registry import LOADERS, EncoderSpec, Registry
from pipeline.errors import UserError

FEATURE_SUFFIX = ".h5"  # --out naming one feature file; anything else names a folder


@dataclass(frozen=True)
class Output:
    """One encoder of a pass and the feature file it writes."""

    spec: EncoderSpec  # with the pooling this run asks for
    weights: str  # its --weights value
    path: Path
    config: ExtractConfig  # its settings, as a run of it alone would have them


def _values(value: str | Sequence[str]) -> tuple[str, ...]:
    """A setting given as one string (Python callers, old recorded configs) or several."""
    return (value,) if isinstance(value, str) else tuple(value)


def _per_model(flag: str, values: tuple[str, ...], models: tuple[str, ...]) -> tuple[str, ...]:
    if len(values) == 1:
        return values * len(models)
    if len(values) != len(models):
        raise UserError(
            f"{flag} {' '.join(values)}: give one value for every --model or one per model "
            f"({len(models)}: {' '.join(models)})"
        )
    return values


def _resolve_spec(name: str, pooling: str, registry: Registry) -> EncoderSpec:
    spec = registry.get(name)
    if pooling == "auto":
        return spec
    poolings = LOADERS[spec.loader].poolings
    if pooling not in poolings:
        raise UserError(
            f"--pooling {pooling}: {spec.name} is a {spec.loader} encoder of "
            f"{spec.modality}s, whose poolings are auto, {', '.join(poolings)}"
        )
    return dataclasses.replace(spec, pooling=pooling)


def _output_paths(out: Path, models: tuple[str, ...]) -> list[Path]:
    """Where each model's file goes: --out itself for one model and a FILE.h5, else
    FOLDER/<model>.h5."""
    if out.suffix == FEATURE_SUFFIX and not out.is_dir():
        if len(models) > 1:
            raise UserError(
                f"--out {out} names one feature file, but {len(models)} models write one "
                f"each: give a folder, e.g. --out {out.with_suffix('')} (it gets "
                f"<model>{FEATURE_SUFFIX} per model)"
            )
        return [out]
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--out {out} is a file but not a {FEATURE_SUFFIX} feature file; give FILE"
            f"{FEATURE_SUFFIX} or a folder"
        )
    return [out / f"{model}{FEATURE_SUFFIX}" for model in models]


def resolve_outputs(config: ExtractConfig, registry: Registry) -> list[Output]:
    """The pass's outputs: per --model its entry, pooling, weights and file.

    Raises:
        UserError: an unknown or broken entry, a model named twice, a pooling its loader
            does not offer, per-model values that do not match the models, encoders of
            several modalities, or several models with --out FILE.h5.
    """
    models = _values(config.model)
    twice = sorted({name for name in models if models.count(name) > 1})
    if twice:
        raise UserError(
            f"--model names {', '.join(twice)} more than once; each model writes one file"
        )
    poolings = _per_model("--pooling", _values(config.pooling), models)
    weights = _per_model("--weights", _values(config.weights), models)
    specs = [
        _resolve_spec(name, pooling, registry)
        for name, pooling in zip(models, poolings, strict=True)
    ]
    modalities = dict.fromkeys(spec.modality for spec in specs)
    if len(modalities) > 1:
        mix = ", ".join(f"{spec.name} ({spec.modality})" for spec in specs)
        raise UserError(
            f"--model {' '.join(models)} mixes modalities ({mix}): the encoders of one pass "
            f"share one modality; run a separate pass per modality "
            f"({', '.join(modalities)})"
        )
    paths = _output_paths(Path(config.out), models)
    return [
        Output(
            spec,
            weight,
            path,
            dataclasses.replace(
                config, model=(name,), pooling=(pooling,), weights=(weight,), out=str(path)
            ),
        )
        for spec, name, pooling, weight, path in zip(
            specs, models, poolings, weights, paths, strict=True
        )
    ]
