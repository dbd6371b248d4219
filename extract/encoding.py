"""One pass of encoding: this process's share of the batches, for every output at once.

Each batch is prepared once for all the outputs that need it: its images decoded once (in
DataLoader workers, from the bytes extract.items read) and transformed for each encoder's
preprocessing. Outputs that run one loaded model with one forward key (several poolings of
a checkpoint; BLIP-2's Q-Former and ViT) get one forward per batch, which each pools its own
way. Each output's finished batch is saved as a part (extract.parts) at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache.store import check_finite
from extract.encoders import Encoder
from extract.items import UniqueItems
from extract.parts import Batch, Parts
from extract.preprocess import DecodedImages, ImageTransform, image_transform
from pipeline import fault_hook
from pipeline.errors import UserError


@dataclass(frozen=True)
class PassBatch:
    """A batch of items and the outputs (indices into the pass's outputs) that need it."""

    keys: Batch
    outputs: tuple[int, ...]


def pass_batches(pending: Sequence[Sequence[Batch]]) -> list[PassBatch]:
    """Every distinct pending batch once, in the outputs' order, with the outputs that need
    it. Outputs with the same plan (a first run of one modality's image encoders; poolings
    of one text encoder) need the same batches, so each is prepared once for all of them."""
    needed_by: dict[Batch, list[int]] = {}
    for output, batches in enumerate(pending):
        for batch in batches:
            needed_by.setdefault(batch, []).append(output)
    return [PassBatch(batch, tuple(outputs)) for batch, outputs in needed_by.items()]


def forward_groups(encoders: Sequence[Encoder]) -> list[list[int]]:
    """The outputs (indices) that one forward serves: the same loaded model, the same
    forward key (extract.encoders.Encoder.forward_key)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for index, encoder in enumerate(encoders):
        groups.setdefault((id(encoder.model), encoder.forward_key()), []).append(index)
    return list(groups.values())


def _long_counts(encoder: Encoder) -> tuple[int, int]:
    return encoder.truncated_reports, encoder.windowed_reports


@dataclass
class _Prepared:
    """How the pass turns a batch's loaded inputs into each forward group's input."""

    groups: list[list[int]]
    transform_of_group: list[int]  # index into the transforms (images and pairs)
    transforms: list[ImageTransform]


def _prepare(encoders: Sequence[Encoder]) -> _Prepared:
    groups = forward_groups(encoders)
    transforms: list[ImageTransform] = []
    transform_of_group = []
    if encoders[0].spec.modality != "text":
        for group in groups:
            transform = image_transform(encoders[group[0]].preprocessing)
            if transform not in transforms:
                transforms.append(transform)
            transform_of_group.append(transforms.index(transform))
    return _Prepared(groups, transform_of_group, transforms)


def _loaded_batches(
    prepared: _Prepared,
    encoders: Sequence[Encoder],
    batches: Sequence[PassBatch],
    items: UniqueItems,
    held: Mapping[Path, Any],
    num_workers: int,
) -> Iterable[Any]:
    """Each batch's inputs: texts as they are; images decoded in DataLoader workers, each
    once, with every transform an output needing its batch asks for."""
    input_of_key = dict(zip(items.keys, items.inputs, strict=True))
    modality = encoders[0].spec.modality
    if modality == "text":
        return ([input_of_key[key] for key in batch.keys] for batch in batches)
    rows = [input_of_key[key] for batch in batches for key in batch.keys]
    needs = []
    for batch in batches:
        wanted = sorted(
            {
                prepared.transform_of_group[number]
                for number, group in enumerate(prepared.groups)
                if set(group) & set(batch.outputs)
            }
        )
        needs += [wanted] * len(batch.keys)
    dataset = DecodedImages(
        [row[0] for row in rows] if modality == "pair" else rows,
        prepared.transforms,
        held,
        needs,
        [row[1] for row in rows] if modality == "pair" else None,
    )
    ends = np.cumsum([len(batch.keys) for batch in batches])
    samples = [
        list(range(end - len(batch.keys), end)) for batch, end in zip(batches, ends, strict=True)
    ]
    return DataLoader(
        dataset,
        batch_sampler=samples,
        num_workers=num_workers,
        pin_memory=any(encoder.device.type == "cuda" for encoder in encoders),
    )


def _group_input(
    loaded: Any, modality: str, prepared: _Prepared, group: int, device: torch.device
) -> Any:
    """Forward group `group`'s input from a loaded batch: texts as they are; its transform's
    uint8 pixels normalised on the encoder's device (a GPU receives a quarter of the bytes)."""
    if modality == "text":
        return loaded
    transform = prepared.transform_of_group[group]
    pixels = loaded[0] if modality == "pair" else loaded
    normalised = prepared.transforms[transform].normalise(
        pixels[transform].to(device, non_blocking=True)
    )
    return (normalised, loaded[1]) if modality == "pair" else normalised


def _in_chunks(group_input: Any, size: int) -> list[Any]:
    """A forward group's input (images, texts, or (images, texts) pairs) in pieces of at
    most `size` items (EncoderSpec.forward_batch; 0: whole)."""
    pair = isinstance(group_input, tuple)
    count = len(group_input[0] if pair else group_input)
    if not size or count <= size:
        return [group_input]
    spans = [slice(start, start + size) for start in range(0, count, size)]
    if pair:
        return [tuple(part[span] for part in group_input) for span in spans]
    return [group_input[span] for span in spans]


def encode_pass(
    encoders: Sequence[Encoder],
    identities: Sequence[str],
    parts: Sequence[Parts],
    batches: Sequence[PassBatch],
    items: UniqueItems,
    held: Mapping[Path, Any],
    num_workers: int,
    show_progress: bool,
) -> list[dict[str, Any]]:
    """Encode `batches` for the outputs that need them and save each output's vectors of a
    batch as a part as soon as they are done; return per output what its encoder counted
    (long reports truncated or windowed).

    Args:
        encoders, identities, parts: per output of the pass, its encoder, this process's
            encoder identity and its parts folder (named by the main process's identity).
        held: images decoded (or bytes read) at screening, by file (extract.items).

    Raises:
        UserError: this process's encoder identity is not the main process's (the parts
            folder's): another node with other package versions, weights or device type.
    """
    for identity, output_parts in zip(identities, parts, strict=True):
        if identity != output_parts.identity:
            raise UserError(
                "this process's encoder differs from the main process's (weights, package "
                "versions, device type or settings): run every process with the same setup"
            )
    modality = encoders[0].spec.modality
    name_of_key = dict(zip(items.keys, items.names, strict=True))
    prepared = _prepare(encoders)
    loaded_batches = _loaded_batches(prepared, encoders, batches, items, held, num_workers)
    progress = tqdm(
        total=sum(len(batch.keys) for batch in batches),
        unit=modality,
        desc=" + ".join(encoder.spec.name for encoder in encoders),
        disable=not show_progress,
    )
    with torch.inference_mode(), progress:
        for batch, loaded in zip(batches, loaded_batches, strict=True):
            names = [name_of_key[key] for key in batch.keys]
            for number, group in enumerate(prepared.groups):
                members = [output for output in group if output in batch.outputs]
                if not members:
                    continue
                lead = encoders[members[0]]
                before = _long_counts(lead)
                group_input = _group_input(loaded, modality, prepared, number, lead.device)
                pooled: dict[int, list[torch.Tensor]] = {output: [] for output in members}
                for chunk in _in_chunks(group_input, lead.spec.forward_batch):
                    outputs = lead.forward(chunk)
                    for output in members:
                        vectors = encoders[output].pool_outputs(outputs)
                        pooled[output].append(vectors.float().cpu())
                truncated, windowed = np.subtract(_long_counts(lead), before)
                for output in members:
                    encoder = encoders[output]
                    if encoder is not lead:  # the reports it met are those the lead met
                        encoder.truncated_reports += int(truncated)
                        encoder.windowed_reports += int(windowed)
                    vectors = torch.cat(pooled[output]).numpy()
                    fault_hook.reached("batch")
                    check_finite(names, vectors, encoder.spec.name)
                    parts[output].write(batch.keys, vectors)
            progress.update(len(batch.keys))
    return [encoder.run_record() for encoder in encoders]
