"""The extract stage: encode each unique image, report or image-report pair of a manifest
once, into HDF5.

Works as a plain process and under `accelerate launch`: every process takes a contiguous
share of the unique items, the vectors are gathered on every process, and only the main
process writes the file.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache.store import FeatureSet, write_features
from extract.encoders import Encoder, torch_dtype
from extract.loaders import load_encoder
from extract.preprocess import ImageFiles, ImageTextPairs, image_transform
from extract.registry import LOADERS, EncoderSpec, Registry, load_registry
from pipeline.config import config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.keys import KEY_SCHEMES, file_key, normalise_text, pair_key, text_key
from pipeline.manifest import image_file, load_manifest

RECORDED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "numpy", "h5py")


@dataclass(frozen=True)
class ExtractConfig:
    """What to encode, with which encoder and weights, and where to write the vectors."""

    model: str = setting(
        "",
        "registered encoder: a built-in one (listed above; one JSON file each in "
        "extract/model_configs/) or one of --registry's",
    )
    registry: str = setting(
        "",
        "YAML (or JSON) file of your own encoders, added to the built-in ones: each "
        "top-level name maps to source (a local Hugging Face folder or hub id), modality "
        "and pooling (see README); python -m extract --list --registry FILE shows them",
    )
    weights: str = setting(
        "tiny",
        "'tiny': seeded random weights of a small config of the same architecture (offline; "
        "for tests and demos); 'hub': the real weights from the local Hugging Face cache "
        "(never downloads); or a FOLDER holding a downloaded checkpoint",
    )
    manifest: str = setting("", "manifest CSV/Parquet; image paths are relative to its folder")
    out: str = setting(
        "", "feature file to write (FILE.h5); written as FILE.h5.partial, renamed when complete"
    )
    classes: tuple[str, ...] = setting(("VCD", "GC"), "labels the manifest may use, negative first")
    pooling: str = setting(
        "auto",
        "how tokens become one vector, part of the features' identity: auto (the encoder's "
        "registered pooling) or one its loader offers: "
        + "; ".join(f"{name} {'|'.join(loader.poolings)}" for name, loader in LOADERS.items()),
    )
    batch_size: int = setting(32, "images or reports per forward pass, per process")
    device: str = setting(
        "auto", "auto (this process's GPU if there is one, else cpu), cpu, cuda or cuda:N"
    )
    dtype: str = setting(
        "float32",
        "model precision: float32, or float16/bfloat16 on a GPU (vectors are saved "
        "as float32 either way)",
    )
    num_workers: int = setting(
        2,
        "processes decoding images while the encoder runs (0: decode inline, which can be "
        "as fast on a machine with 2 cores)",
    )


@dataclass(frozen=True)
class UniqueItems:
    """The distinct contents of a manifest column, each to be encoded once."""

    keys: list[str]  # content keys (pipeline.keys), in order of first appearance
    # per key what the encoder reads: an image file, a normalised report, or both (a pair)
    inputs: list[Any]
    sources: dict[str, str]  # manifest image_path -> image key; empty for reports


def unique_items(table: pd.DataFrame, manifest_path: str | Path, modality: str) -> UniqueItems:
    """Key every image file (by its bytes), report (by its normalised text) or image-report
    pair (by both keys) of `table`."""
    if modality in ("image", "pair"):
        sources = {
            path: file_key(image_file(manifest_path, path)) for path in table["image_path"].unique()
        }
    if modality == "image":
        file_of_key: dict[str, Path] = {}
        for path, key in sources.items():  # identical files under two names: encode one
            file_of_key.setdefault(key, image_file(manifest_path, path))
        return UniqueItems(list(file_of_key), list(file_of_key.values()), sources)
    if modality == "pair":
        pair_of_key: dict[str, tuple[Path, str]] = {}
        for path, report in zip(table["image_path"], table["report_text"], strict=True):
            key = pair_key(sources[path], text_key(report))
            pair_of_key.setdefault(key, (image_file(manifest_path, path), normalise_text(report)))
        return UniqueItems(list(pair_of_key), list(pair_of_key.values()), sources)
    text_of_key: dict[str, str] = {}
    for report in table["report_text"]:
        text_of_key.setdefault(text_key(report), normalise_text(report))
    return UniqueItems(list(text_of_key), list(text_of_key.values()), {})


def _resolve_spec(config: ExtractConfig, registry: Registry) -> EncoderSpec:
    spec = registry.get(config.model)
    if config.pooling == "auto":
        return spec
    poolings = LOADERS[spec.loader].poolings
    if config.pooling not in poolings:
        raise UserError(
            f"--pooling {config.pooling}: {spec.name} is a {spec.loader} encoder of "
            f"{spec.modality}s, whose poolings are auto, {', '.join(poolings)}"
        )
    return dataclasses.replace(spec, pooling=config.pooling)


def _warn_about_broken_entries(registry: Registry, model: str) -> None:
    problems = [problem for name, problem in sorted(registry.broken.items()) if name != model]
    for problem in [*problems, *registry.ignored]:
        print(f"warning: skipped a registry entry: {problem}", file=sys.stderr)


def _process_state(device_name: str) -> PartialState:
    # Told it runs on the CPU, accelerate joins the processes of a multi-process launch with
    # gloo; otherwise, on a machine without GPUs, each process would think it is alone (and
    # write the file).
    on_cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=on_cpu)


def _device(name: str, state: PartialState) -> torch.device:
    if name == "auto":
        return state.device
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def _batches(encoder: Encoder, inputs: list[Any], config: ExtractConfig) -> Iterable[Any]:
    if encoder.spec.modality in ("image", "pair"):
        transform = image_transform(encoder.preprocessing)
        if encoder.spec.modality == "image":
            dataset = ImageFiles(inputs, transform)
        else:
            dataset = ImageTextPairs(
                [path for path, _ in inputs], [text for _, text in inputs], transform
            )
        return DataLoader(
            dataset,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            pin_memory=encoder.device.type == "cuda",
        )
    return (
        inputs[start : start + config.batch_size]
        for start in range(0, len(inputs), config.batch_size)
    )


def _encode(
    encoder: Encoder, shard: list[tuple[str, Any]], config: ExtractConfig, show_progress: bool
) -> list[tuple[str, np.ndarray]]:
    """(key, input) pairs -> (key, vector) pairs, in batches, without gradients."""
    vectors = []
    progress = tqdm(
        total=len(shard),
        unit=encoder.spec.modality,
        desc=encoder.spec.name,
        disable=not show_progress,
    )
    with torch.inference_mode(), progress:
        for batch in _batches(encoder, [item for _, item in shard], config):
            encoded = encoder.encode(batch)
            vectors.extend(encoded.cpu().numpy())
            progress.update(len(encoded))
    return [(key, vector) for (key, _), vector in zip(shard, vectors, strict=True)]


def _provenance(
    config: ExtractConfig, spec: EncoderSpec, encoder: Encoder, state: PartialState
) -> dict[str, Any]:
    return {
        "encoder": spec.name,
        "modality": spec.modality,
        "source": spec.source,
        "loader": spec.loader,
        "registry_entry": spec.origin,
        "weights": config.weights,
        "weights_folder": str(encoder.weights.folder) if encoder.weights.folder else None,
        **encoder.provenance(),
        "pooling": spec.pooling,
        "dtype": config.dtype,
        "device_type": encoder.device.type,
        "num_processes": state.num_processes,
        "key_scheme": KEY_SCHEMES[spec.modality],
        "package_versions": {name: metadata.version(name) for name in RECORDED_PACKAGES},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extract_config": config_to_dict(config),
        "manifest": {"path": str(config.manifest), "sha256": file_key(config.manifest)},
    }


def run(config: ExtractConfig) -> Path:
    """Encode every unique image, report or pair of the manifest once; write the feature file.

    Returns:
        The path of the feature file.

    Raises:
        UserError: an unknown or broken encoder entry, a bad manifest (checked before any
            encoder loads), unavailable weights, or an unusable device or dtype.
    """
    require_paths(config, "model", "manifest", "out")
    registry = load_registry(config.registry)
    spec = _resolve_spec(config, registry)
    # Reports can be re-encoded where the images are not (a laptop, another LLM).
    table = load_manifest(config.manifest, config.classes, check_images=spec.modality != "text")
    state = _process_state(config.device)
    if state.is_main_process:
        _warn_about_broken_entries(registry, config.model)
    device = _device(config.device, state)
    dtype = torch_dtype(config.dtype, device)
    encoder = load_encoder(spec, config.weights, device, dtype)
    items = unique_items(table, config.manifest, spec.modality)

    with state.split_between_processes(list(zip(items.keys, items.inputs, strict=True))) as shard:
        encoded = _encode(encoder, shard, config, show_progress=state.is_main_process)
    # Every process must take part in the gather. A key can come back twice (padding or
    # an uneven split repeats items); its vectors are equal, so one is kept.
    vector_of_key = dict(gather_object(encoded))
    out = Path(config.out)
    if state.is_main_process:
        features = FeatureSet(
            keys=tuple(items.keys),
            vectors=np.stack([vector_of_key[key] for key in items.keys]).astype(np.float32),
            provenance=_provenance(config, spec, encoder, state),
            sources=items.sources,
        )
        write_features(out, features)
        print(
            f"wrote {len(items.keys)} {spec.modality} vectors of width {features.width} "
            f"({spec.name}, {config.weights} weights) to {out}"
        )
    state.wait_for_everyone()
    return out
