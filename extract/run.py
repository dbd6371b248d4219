"""The extract stage: encode each unique image, report or image-report pair of a manifest
once, with one encoder or several in one pass, into one HDF5 feature file per encoder,
losing no finished work.

A pass reads each image file once (extract.items), loads each checkpoint once and runs one
forward per batch for the encoders that share it (extract.loaders, extract.encoding). Per
output it keeps what is done (extract.resume: an up-to-date file is left alone, finished
batches are kept as parts). It works as a plain process and under `accelerate launch`
(extract.processes): the main process takes every output's lock and plans, every process
encodes its share of the batches into part files, and after a barrier the main process
gathers each output's vectors from its parts into its feature file. Vectors never travel
between processes except through those files.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import PartialState

from cache.store import FeatureSet
from extract.config import ExtractConfig
from extract.encoders import Encoder, torch_dtype
from extract.encoding import PassBatch, encode_pass, forward_groups, pass_batches
from extract.items import (
    ImageReads,
    UniqueItems,
    check_image_files,
    check_one_patient_per_image,
    paths_to_read,
    read_images,
    skipped_summary,
    summarise_skipped,
    unique_items,
)
from extract.loaders import load_encoders
from extract.outputs import Output, resolve_outputs
from extract.parts import Parts
from extract.processes import device_of, on_every_process, on_main_process, process_state
from extract.provenance import encoder_identity, output_provenance
from extract.registry import Registry, load_registry
from extract.resume import (
    OutputPlan,
    consolidate,
    plan_output,
    read_existing,
    refuse_to_replace,
    reusable,
)
from pipeline.config import check_declared, config_to_dict, require_paths
from pipeline.errors import UserError
from pipeline.keys import file_key
from pipeline.lock import output_lock
from pipeline.manifest import load_manifest
from pipeline.memory import reuse_freed_memory

LONG_REPORT_COUNTS = ("truncated_reports", "windowed_reports")  # of Encoder.run_record


def _warn_about_broken_entries(registry: Registry, models: Sequence[str]) -> None:
    problems = [problem for name, problem in sorted(registry.broken.items()) if name not in models]
    for problem in [*problems, *registry.ignored]:
        print(f"warning: skipped a registry entry: {problem}", file=sys.stderr)


def run(config: ExtractConfig) -> Path:
    """Encode every unique image, report or pair of the manifest once, with each --model;
    write one feature file per model.

    Resumable per output: finished batches are saved as parts (extract.parts) and a rerun
    of the same command encodes only the rest; vectors of an existing output are reused
    when their encoder identity matches; an output that already holds everything is left as
    it is (the others of the pass still run). One run at a time writes an output
    (pipeline.lock: each output file has its lock, all held for the pass). Under
    `accelerate launch` each process encodes its share of the batches into the parts and
    the main process writes the files.

    Returns:
        The feature file (--out FILE.h5), or the folder holding one per model.

    Raises:
        UserError: an unknown or broken encoder entry, a mix of modalities, a bad manifest
            or, with --strict, bad items (all checked before any encoder loads), another
            run writing one of the outputs, unavailable weights, an unusable device or
            dtype, vectors holding NaN or inf, or a full disk.
    """
    require_paths(config, "model", "manifest", "out")
    check_declared(config)  # also when the config was made in Python, not from flags
    registry = load_registry(config.registry)
    outputs = resolve_outputs(config, registry)
    modality = outputs[0].spec.modality
    image_root = config.image_root or None
    # Reports can be re-encoded where the images are not (a laptop, another LLM). Missing
    # image files are skipped by screening like other bad ones, unless --strict. The pass
    # checks image contents itself, from its one read of each file (extract.items).
    table = load_manifest(
        config.manifest,
        config.classes,
        check_images=False,
        allow_missing_images=not config.strict,
        allow_empty_reports=not config.strict,
        labels_required=False,  # encoders never read labels: new data can be extracted
        image_root=image_root,
        labels_per_exam=config.labels_per_exam,
    )
    if modality != "text":
        check_image_files(table, config.manifest, image_root, config.strict)
    state = process_state(config.device)
    reuse_freed_memory()  # each batch frees and allocates the same activations again
    with ExitStack() as held:

        def lock_every_output() -> None:
            for output in sorted(outputs, key=lambda output: output.path):
                held.enter_context(output_lock(output.path, config.wait_for_lock))

        on_main_process(state, lock_every_output)
        _locked_run(config, outputs, registry, table, state)
    return Path(config.out)


def _read_items(
    config: ExtractConfig, modality: str, table: pd.DataFrame, state: PartialState
) -> tuple[UniqueItems, ImageReads]:
    """Screen and key the manifest's items, each image file read once (each process reads
    its share); returns the items and this process's reads (with the bytes it holds).

    Raises:
        UserError: an image content under two patients, bad items with --strict, or
            nothing left to encode.
    """
    image_root = config.image_root or None
    paths = list(table["image_path"].unique()) if modality != "text" else []
    share = paths_to_read(paths, config.batch_size, state.process_index, state.num_processes)
    reads = read_images(
        share,
        config.manifest,
        image_root,
        show_progress=state.is_main_process and bool(paths),
    )
    checks = {
        path: check
        for part in on_every_process(lambda: reads.checks)
        for path, check in part.items()
    }
    if modality != "text":
        check_one_patient_per_image(table, config.manifest, checks)
    items = unique_items(table, config.manifest, modality, checks, image_root=image_root)
    if items.skipped and config.strict:
        raise UserError(f"--strict: {skipped_summary(items.skipped)}")
    if not items.keys:
        raise UserError(
            f"{config.manifest}: nothing to encode, every {modality} item is bad: "
            f"{skipped_summary(items.skipped)}"
        )
    return items, reads


def _long_reports_summary(names: Sequence[str], encoder: Encoder) -> str:
    first = "; ".join(names[:3])
    limit = encoder.max_length
    if encoder.preprocessing.get("long_reports") == "windows":
        return f"{len(names)} report(s) over {limit} tokens encoded in windows (first: {first})"
    whole = (
        "to encode them whole, give this encoder preprocessing.long_reports: windows in a "
        "--registry file (see README)"
        if encoder.supports_windows
        else f"{encoder.spec.name}'s pooling cannot encode them in windows; an encoder with "
        "mean pooling can (preprocessing.long_reports: windows)"
    )
    return (
        f"warning: {len(names)} report(s) are longer than {encoder.spec.name}'s {limit} "
        f"tokens and were truncated to their first {limit} (first: {first}); {whole}"
    )


def _run_record(
    encoded: list[int],
    plan: OutputPlan,
    items: UniqueItems,
    encoder: Encoder,
    records: list[dict[str, Any]],
    in_pass: dict[str, list[str]],
) -> dict[str, Any]:
    """How this run went for one output (kept apart from the vectors' provenance): per
    process the items it encoded, what was reused, skipped, padded, the encoders' counts of
    long reports (over the reports this run encoded) summed over the processes, and the
    pass it was part of."""
    record: dict[str, Any] = {
        "num_processes": len(encoded),
        "encoded_per_process": encoded,
        "encoded": sum(encoded),
        "reused_from_file": plan.from_file,
        "reused_from_parts": plan.from_parts,
        "skipped": len(items.skipped),
        "padding_share": plan.padding_share,
        "padding_share_unsorted": plan.padding_share_unsorted,
        **in_pass,
    }
    if encoder.tokenizer is not None:
        counts = {name: sum(each[name] for each in records) for name in LONG_REPORT_COUNTS}
        record["long_reports"] = {**records[0], **counts}
    return record


@dataclass(frozen=True)
class _Running:
    """One output of the pass on this process: its encoder and what identifies its vectors."""

    output: Output
    encoder: Encoder
    provenance: dict[str, Any]
    identity: str  # this process's encoder identity
    existing: FeatureSet | None  # the output already on disk, read once (main process)


def _load(
    config: ExtractConfig,
    outputs: Sequence[Output],
    existing: dict[Path, FeatureSet | None],
    state: PartialState,
) -> list[_Running]:
    """Load every checkpoint of the pass once and describe each output's vectors."""
    device = device_of(config.device, state)
    encoders = load_encoders(
        [output.spec for output in outputs],
        [output.weights for output in outputs],
        device,
        torch_dtype(config.dtype, device),
    )
    manifest_sha256 = file_key(config.manifest)
    running = []
    for output, encoder in zip(outputs, encoders, strict=True):
        provenance = output_provenance(
            encoder,
            output.weights,
            config.dtype,
            config_to_dict(output.config),
            config.manifest,
            manifest_sha256,
        )
        identity = encoder_identity(provenance)
        held = existing.get(output.path)
        running.append(_Running(output, encoder, provenance, identity, held))
    return running


def _locked_run(
    config: ExtractConfig,
    outputs: list[Output],
    registry: Registry,
    table: pd.DataFrame,
    state: PartialState,
) -> None:
    """run() once this run holds every output's lock: screen, plan, encode, consolidate."""
    modality = outputs[0].spec.modality
    items, reads = _read_items(config, modality, table, state)
    existing: dict[Path, FeatureSet | None] = {}
    if state.is_main_process:  # each existing output read once, kept for reuse below
        existing = {output.path: read_existing(output.path) for output in outputs}
    if not config.overwrite:
        on_main_process(
            state,
            lambda: [
                refuse_to_replace(output.path, output.spec, items, existing[output.path])
                for output in outputs
            ],
        )
    if state.is_main_process:
        _warn_about_broken_entries(registry, [output.spec.name for output in outputs])
    runs = _load(config, outputs, existing, state)
    plans = on_main_process(
        state,
        lambda: [
            plan_output(
                run.output.path,
                run.identity,
                run.provenance["manifest"]["sha256"],
                items,
                run.encoder,
                config.batch_size,
                reusable(run.existing, run.identity),
            )
            for run in runs
        ],
    )
    todo = [(run, plan) for run, plan in zip(runs, plans, strict=True) if not plan.up_to_date]
    if state.is_main_process:
        for run, plan in zip(runs, plans, strict=True):
            if plan.up_to_date:
                print(
                    f"{run.output.path} is up to date: it holds all {len(items.keys)} "
                    f"{modality} vectors"
                )
    if todo:
        batches = pass_batches([plan.pending for _, plan in todo])
        shares = [batches[rank :: state.num_processes] for rank in range(state.num_processes)]
        records = on_every_process(
            lambda: encode_pass(
                [run.encoder for run, _ in todo],
                [run.identity for run, _ in todo],
                [Parts(run.output.path, plan.identity) for run, plan in todo],
                shares[state.process_index],
                items,
                reads.held,
                config.num_workers,
                state.is_main_process,
            )
        )
        if state.is_main_process:
            _write_outputs(todo, [run.encoder.spec.name for run in runs], items, shares, records)
    if state.is_main_process:
        summarise_skipped(items.skipped)


def _write_outputs(
    todo: Sequence[tuple[_Running, OutputPlan]],
    names: list[str],
    items: UniqueItems,
    shares: Sequence[Sequence[PassBatch]],
    records: Sequence[Sequence[dict[str, Any]]],
) -> None:
    """Main process: each encoded output's file, from its parts, and what it took.

    Args:
        names: every encoder of the pass (those up to date too).
        shares: each process's batches; records: each process's encoder counts per output.
    """
    shared_with = {}
    for group in forward_groups([run.encoder for run, _ in todo]):
        for member in group:
            shared_with[member] = [todo[other][0].output.spec.name for other in group]
            shared_with[member].remove(todo[member][0].output.spec.name)
    modality = todo[0][0].output.spec.modality
    for position, (run, plan) in enumerate(todo):
        encoded = [
            sum(len(batch.keys) for batch in share if position in batch.outputs) for share in shares
        ]
        in_pass = {"pass": names, "forward_shared_with": shared_with[position]}
        run.provenance["run"] = _run_record(
            encoded, plan, items, run.encoder, [each[position] for each in records], in_pass
        )
        path, reused = run.output.path, reusable(run.existing, plan.identity)
        features = consolidate(path, run.provenance, items, run.encoder.width, plan, reused)
        print(
            f"wrote {len(items.keys)} {modality} vectors of width {features.width} "
            f"({run.output.spec.name}, {run.output.weights} weights) to {path}: encoded "
            f"{sum(encoded)} ({' + '.join(map(str, encoded))} by {len(shares)} "
            f"process(es)), reused {plan.from_file} from the existing file and "
            f"{plan.from_parts} from parts"
        )
        if plan.padding_share is not None:
            print(
                f"padding: {plan.padding_share:.1%} of report tokens "
                f"({plan.padding_share_unsorted:.1%} without sorting by length)"
            )
        if plan.long_reports:
            print(_long_reports_summary(plan.long_reports, run.encoder), file=sys.stderr)
