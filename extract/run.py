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

import dataclasses
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import PartialState

from extract.encoders import Encoder, torch_dtype
from extract.encoding import encode_pass, forward_groups, pass_batches
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
from extract.parts import Parts
from extract.processes import device_of, on_every_process, on_main_process, process_state
from extract.provenance import encoder_identity, output_provenance
from extract.registry import LOADERS, EncoderSpec, Registry, load_registry
from extract.resume import (
    OutputPlan,
    consolidate,
    plan_output,
    read_existing,
    refuse_to_replace,
    reusable,
)
from pipeline.config import check_declared, config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.keys import file_key
from pipeline.lock import output_lock
from pipeline.manifest import load_manifest

LONG_REPORT_COUNTS = ("truncated_reports", "windowed_reports")  # of Encoder.run_record
FEATURE_SUFFIX = ".h5"  # --out naming one feature file; anything else names a folder


@dataclass(frozen=True)
class ExtractConfig:
    """What to encode, with which encoders and weights, and where to write the vectors."""

    model: tuple[str, ...] = setting(
        (),
        "registered encoder(s): built-in ones (listed above; one JSON file each in "
        "extract/model_configs/) or --registry's. Several, all of one modality (image, text "
        "or pair), are one pass: each image is read and decoded once for all of them, a "
        "checkpoint they share is loaded once and run once per batch, and each writes its "
        "own file, as a run of it alone would",
    )
    registry: str = setting(
        "",
        "YAML (or JSON) file of your own encoders, added to the built-in ones: each "
        "top-level name maps to source (a local Hugging Face folder or hub id), modality "
        "and pooling (see README); python -m extract --list --registry FILE shows them",
    )
    weights: tuple[str, ...] = setting(
        ("tiny",),
        "one value for every --model, or one per model: 'tiny': seeded random weights of a "
        "small config of the same architecture (offline; for tests and demos); 'hub': the "
        "real weights from the local Hugging Face cache (never downloads); or a FOLDER "
        "holding a downloaded checkpoint",
    )
    manifest: str = setting("", "manifest CSV/Parquet; image paths are relative to its folder")
    out: str = setting(
        "",
        "FILE.h5 (one --model) or a FOLDER, which gets FOLDER/<model>.h5 per model; finished "
        "batches go to FILE.h5.parts/ at once, so the same command resumes a killed run; a "
        "file is written as FILE.h5.partial and renamed when complete; FILE.h5.lock keeps a "
        "second run out of each file",
    )
    classes: tuple[str, ...] = setting(("VCD", "GC"), "labels the manifest may use, negative first")
    pooling: tuple[str, ...] = setting(
        ("auto",),
        "how tokens become one vector, part of the features' identity; one value for every "
        "--model, or one per model: auto (the encoder's registered pooling) or one its loader "
        "offers: "
        + "; ".join(f"{name} {'|'.join(loader.poolings)}" for name, loader in LOADERS.items()),
    )
    batch_size: int = setting(32, "images or reports per forward pass, per process", at_least=1)
    device: str = setting(
        "auto", "auto (this process's GPU if there is one, else cpu), cpu, cuda or cuda:N"
    )
    dtype: str = setting(
        "float32",
        "model precision: float32, bfloat16 (a GPU, or a CPU with bf16 units) or float16 "
        "(a GPU only); vectors are saved as float32 either way",
    )
    num_workers: int = setting(
        2,
        "processes decoding images while the encoders run (0: decode inline, which can be "
        "as fast on a machine with 2 cores)",
        at_least=0,
    )
    wait_for_lock: float = setting(
        0,
        "seconds to wait, per output, while another run writes it (0: refuse at once, exit "
        "code 2, naming the other run)",
        at_least=0,
    )
    overwrite: bool = setting(
        False,
        "true: replace a complete output holding vectors of another encoder or modality, or "
        "of other data (no item in common); false: refuse, so a typo costs no finished work",
    )
    image_root: str = setting(
        "",
        "folder every image must lie in (paths stay relative to the manifest's folder); "
        "empty: the manifest's folder, so paths like ../x.png are refused",
    )
    labels_per_exam: bool = setting(
        False,
        "true: a patient's exams (exam_id) may have different labels; false: one label per patient",
    )
    strict: bool = setting(
        False,
        "true: refuse (exit code 2) a manifest with any bad item (a missing, empty or "
        "damaged image file; an empty report or one with control characters) before any "
        "encoder loads; false: skip them, record them in the file and print a summary",
    )


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
        num_workers=config.num_workers,
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
    existing = {}
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
    device = device_of(config.device, state)
    encoders = load_encoders(
        [output.spec for output in outputs],
        [output.weights for output in outputs],
        device,
        torch_dtype(config.dtype, device),
    )
    manifest_sha256 = file_key(config.manifest)
    provenances = [
        output_provenance(
            encoder,
            output.weights,
            config.dtype,
            config_to_dict(output.config),
            config.manifest,
            manifest_sha256,
        )
        for output, encoder in zip(outputs, encoders, strict=True)
    ]
    identities = [encoder_identity(provenance) for provenance in provenances]

    def plan_every_output() -> list[OutputPlan]:
        return [
            plan_output(
                output.path,
                identity,
                manifest_sha256,
                items,
                encoder,
                config.batch_size,
                reusable(existing[output.path], identity),
            )
            for output, encoder, identity in zip(outputs, encoders, identities, strict=True)
        ]

    plans = on_main_process(state, plan_every_output)
    running = [number for number, plan in enumerate(plans) if not plan.up_to_date]
    if state.is_main_process:
        for number, output in enumerate(outputs):
            if plans[number].up_to_date:
                print(
                    f"{output.path} is up to date: it holds all {len(items.keys)} "
                    f"{modality} vectors"
                )
    if not running:
        if state.is_main_process:
            summarise_skipped(items.skipped)
        return
    batches = pass_batches([plans[number].pending for number in running])
    shares = [batches[rank :: state.num_processes] for rank in range(state.num_processes)]
    records = on_every_process(
        lambda: encode_pass(
            [encoders[number] for number in running],
            [identities[number] for number in running],
            [Parts(outputs[number].path, plans[number].identity) for number in running],
            shares[state.process_index],
            items,
            reads.held,
            config.num_workers,
            state.is_main_process,
        )
    )
    if not state.is_main_process:
        return
    names = [output.spec.name for output in outputs]
    shared_with = {}
    for group in forward_groups([encoders[number] for number in running]):
        for member in group:
            others = [names[running[other]] for other in group if other != member]
            shared_with[running[member]] = others
    for position, number in enumerate(running):
        output, encoder, plan = outputs[number], encoders[number], plans[number]
        encoded = [
            sum(len(batch.keys) for batch in share if position in batch.outputs) for share in shares
        ]
        in_pass = {"pass": names, "forward_shared_with": shared_with[number]}
        provenances[number]["run"] = _run_record(
            encoded, plan, items, encoder, [each[position] for each in records], in_pass
        )
        features = consolidate(
            output.path,
            provenances[number],
            items,
            encoder.width,
            plan,
            reusable(existing[output.path], plan.identity),
        )
        print(
            f"wrote {len(items.keys)} {modality} vectors of width {features.width} "
            f"({output.spec.name}, {output.weights} weights) to {output.path}: encoded "
            f"{sum(encoded)} ({' + '.join(map(str, encoded))} by {state.num_processes} "
            f"process(es)), reused {plan.from_file} from the existing file and "
            f"{plan.from_parts} from parts"
        )
        if plan.padding_share is not None:
            print(
                f"padding: {plan.padding_share:.1%} of report tokens "
                f"({plan.padding_share_unsorted:.1%} without sorting by length)"
            )
        if plan.long_reports:
            print(_long_reports_summary(plan.long_reports, encoder), file=sys.stderr)
    summarise_skipped(items.skipped)
