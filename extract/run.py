"""The extract stage: encode each unique image, report or image-report pair of a manifest
once, into HDF5, losing no finished work.

Works as a plain process and under `accelerate launch`: the main process takes the
output's lock and plans the batches (extract.batching), every process encodes its share
of them and saves each finished batch as a part file (cache.parts), and after a barrier
the main process gathers the vectors from the parts into the feature file. Vectors never
travel between processes except through those files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache.parts import Batch, Parts
from cache.store import FeatureSet, check_finite, read_features, write_features
from extract.batching import padding_share, plan_batches
from extract.encoders import Encoder, torch_dtype
from extract.loaders import load_encoder
from extract.preprocess import ImageFiles, ImageTextPairs, image_transform
from extract.registry import LOADERS, EncoderSpec, Registry, load_registry
from extract.screening import check_image, screen_report, shown_safely
from pipeline import fault_hook
from pipeline.atomic import PARTIAL_SUFFIX
from pipeline.config import check_declared, config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.keys import KEY_SCHEMES, file_key, normalise_text, pair_key, text_key
from pipeline.lock import output_lock
from pipeline.manifest import image_file, load_manifest

RECORDED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "numpy", "h5py")
# Provenance entries that say how and when a run went, not what its vectors are: two runs
# differing only in these may share vectors (see encoder_identity).
NOT_IDENTITY = frozenset(
    {
        "created_utc",
        "extract_config",
        "manifest",
        "weights",
        "weights_folder",
        "registry_entry",
        "run",
    }
)
LONG_REPORT_COUNTS = ("truncated_reports", "windowed_reports")  # of Encoder.run_record
REPORT_NAME_CHARS = 40  # of a report, in messages and in the skipped items' names
# Set by every launcher that starts several processes (torchrun, mpirun).
_RANK_VARS = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
Result = TypeVar("Result")


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
        "",
        "feature file to write (FILE.h5); finished batches go to FILE.h5.parts/ at once, so "
        "the same command resumes a killed run; the file is written as FILE.h5.partial and "
        "renamed when complete; FILE.h5.lock keeps a second run out",
    )
    classes: tuple[str, ...] = setting(("VCD", "GC"), "labels the manifest may use, negative first")
    pooling: str = setting(
        "auto",
        "how tokens become one vector, part of the features' identity: auto (the encoder's "
        "registered pooling) or one its loader offers: "
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
        "processes decoding images while the encoder runs (0: decode inline, which can be "
        "as fast on a machine with 2 cores)",
        at_least=0,
    )
    wait_for_lock: float = setting(
        0,
        "seconds to wait while another run writes the same --out (0: refuse at once, exit "
        "code 2, naming the other run)",
        at_least=0,
    )
    overwrite: bool = setting(
        False,
        "true: replace a complete --out holding vectors of another encoder or modality, or "
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
class UniqueItems:
    """The distinct contents of a manifest column, each to be encoded once."""

    keys: list[str]  # content keys (pipeline.keys), in order of first appearance
    # per key what the encoder reads: an image file, a normalised report, or both (a pair)
    inputs: list[Any]
    names: list[str]  # per key what a message shows: an image path, a report's beginning
    sources: dict[str, str]  # manifest image_path -> image key; empty for reports
    skipped: dict[str, str]  # item name (see cache.store) -> why it cannot be encoded


def _report_name(key: str, report: str) -> str:
    # shown_safely: a NUL cannot be stored in the file's string datasets
    return f"{key} {shown_safely(report[:REPORT_NAME_CHARS])}"


def check_images(
    paths: Sequence[str],
    manifest_path: str | Path,
    show_progress: bool = False,
    image_root: str | Path | None = None,
) -> dict[str, tuple[str, str | None]]:
    """Screen (extract.screening) and key every image file in one read of each.

    Returns:
        Per manifest image path (key, None) for a usable image, ("", reason) for one that
        is missing, empty, of another kind or damaged.
    """
    return {
        path: check_image(image_file(manifest_path, path, image_root))
        for path in tqdm(paths, desc="checking images", unit="image", disable=not show_progress)
    }


def unique_items(
    table: pd.DataFrame,
    manifest_path: str | Path,
    modality: str,
    image_checks: Mapping[str, tuple[str, str | None]],
    image_root: str | Path | None = None,
) -> UniqueItems:
    """Key every image file (by its bytes), report (by its normalised text) or image-report
    pair (by both keys) of `table`, leaving out the items screening finds unusable.

    Args:
        image_checks: check_images of the table's image paths (unused for reports).
        image_root: the folder images may lie in; None: the manifest's folder.

    A bad image is skipped with its reason, and so is an unusable report, and a pair
    either of whose halves is.
    """
    skipped: dict[str, str] = {}
    sources: dict[str, str] = {}
    if modality in ("image", "pair"):
        for path in table["image_path"].unique():
            key, reason = image_checks[path]
            if reason:
                skipped[path] = reason
            else:
                sources[path] = key
    bad_reports: set[str] = set()
    if modality in ("text", "pair"):
        for report in table["report_text"].unique():
            reason = screen_report(report)
            if reason:
                bad_reports.add(report)
                skipped[_report_name(text_key(report), normalise_text(report))] = reason
    inputs: dict[str, Any] = {}
    names: dict[str, str] = {}
    if modality == "image":
        for path, key in sources.items():  # identical files under two names: encode one
            inputs.setdefault(key, image_file(manifest_path, path, image_root))
            names.setdefault(key, path)
    elif modality == "pair":
        for path, report in zip(table["image_path"], table["report_text"], strict=True):
            if path in sources and report not in bad_reports:
                key = pair_key(sources[path], text_key(report))
                text = normalise_text(report)
                inputs.setdefault(key, (image_file(manifest_path, path, image_root), text))
                names.setdefault(key, f"{path} | {text[:REPORT_NAME_CHARS]}")
    else:
        for report in table["report_text"]:
            if report not in bad_reports:
                key, text = text_key(report), normalise_text(report)
                inputs.setdefault(key, text)
                names.setdefault(key, text[:REPORT_NAME_CHARS])
    return UniqueItems(list(inputs), list(inputs.values()), list(names.values()), sources, skipped)


def _skipped_summary(skipped: dict[str, str]) -> str:
    counts = Counter(skipped.values())
    first = "; ".join(f"{name} ({reason})" for name, reason in list(skipped.items())[:3])
    by_reason = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
    return f"{len(skipped)} bad item(s) ({by_reason}); first: {first}"


def _summarise_skipped(skipped: dict[str, str]) -> None:
    """At the end of a run, so that it is not lost above the progress bars."""
    if skipped:
        print(f"warning: skipped {_skipped_summary(skipped)}", file=sys.stderr)


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
    """This process's place among the processes of a launch.

    Raises:
        UserError: `accelerate launch --cpu --num_processes N` (N > 1) started this one
            process alone: accelerate's --cpu launcher starts N processes only through
            mpirun (--mpirun_hostfile); it tells the process nothing but MASTER_ADDR,
            so a run would silently use one process.
    """
    launched_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    if launched_cpu and "MASTER_ADDR" in os.environ and not any(map(os.environ.get, _RANK_VARS)):
        raise UserError(
            "accelerate launch --cpu starts one process whatever --num_processes says (it "
            "needs mpirun for more); for several CPU processes use accelerate launch "
            "--multi_gpu --num_processes N ... --device cpu (torchrun processes joined "
            "with gloo), or drop --num_processes"
        )
    # Told it runs on the CPU, accelerate joins the processes of a multi-process launch with
    # gloo; otherwise, on a machine without GPUs, each process would think it is alone.
    on_cpu = device_name == "cpu" or (
        device_name == "auto" and (launched_cpu or not torch.cuda.is_available())
    )
    return PartialState(cpu=on_cpu)


def _device(name: str, state: PartialState) -> torch.device:
    if name == "auto":
        return state.device
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def _on_every_process(action: Callable[[], Result]) -> list[Result]:
    """Run `action` on every process and return every process's result, in rank order.

    Also a barrier. A process whose action fails still takes part, so that the others
    stop with its error instead of waiting for it forever.
    """
    result, failure = None, None
    try:
        result = action()
    except Exception as error:  # noqa: BLE001 (re-raised below, after the others learn of it)
        failure = error
    outcomes = gather_object([(result, None if failure is None else str(failure))])
    if failure is not None:
        raise failure
    for rank, (_, message) in enumerate(outcomes):
        if message is not None:
            raise UserError(message if rank == 0 else f"process {rank}: {message}")
    return [outcome for outcome, _ in outcomes]


def _on_main_process(state: PartialState, action: Callable[[], Result]) -> Result:
    """Run `action` on the main process only; every process gets its result (or error)."""
    return _on_every_process(action if state.is_main_process else lambda: None)[0]


def _token_lengths(encoder: Encoder, keys: Sequence[str], texts: Sequence[str]) -> dict[str, int]:
    """Tokens per report before truncation."""
    # Nothing may be left to encode (every item held by the file); tokenizers fail on [].
    lengths = encoder.token_lengths(texts) if texts else []
    return dict(zip(keys, lengths, strict=True))


def _batches(
    encoder: Encoder, batches: Sequence[Batch], input_of_key: dict[str, Any], config: ExtractConfig
) -> Iterable[Any]:
    """The encoder's input, batch by batch; images decoded in DataLoader workers."""
    if encoder.spec.modality == "text":
        return ([input_of_key[key] for key in batch] for batch in batches)
    inputs = [input_of_key[key] for batch in batches for key in batch]
    transform = image_transform(encoder.preprocessing)
    if encoder.spec.modality == "image":
        dataset = ImageFiles(inputs, transform)
    else:
        dataset = ImageTextPairs(
            [path for path, _ in inputs], [text for _, text in inputs], transform
        )
    ends = np.cumsum([len(batch) for batch in batches])
    rows = [list(range(end - len(batch), end)) for batch, end in zip(batches, ends, strict=True)]
    return DataLoader(
        dataset,
        batch_sampler=rows,
        num_workers=config.num_workers,
        pin_memory=encoder.device.type == "cuda",
    )


def _encode(
    encoder: Encoder,
    identity: str,
    batches: Sequence[Batch],
    items: UniqueItems,
    parts: Parts,
    config: ExtractConfig,
    show_progress: bool,
) -> dict[str, Any]:
    """Encode `batches` and save each as a part as soon as it is done; return what the
    encoder counted (long reports truncated or windowed).

    Raises:
        UserError: this process's encoder identity is not the main process's (the parts
            folder's): another node with other package versions, weights or device type.
    """
    if identity != parts.identity:
        raise UserError(
            "this process's encoder differs from the main process's (weights, package "
            "versions, device type or settings): run every process with the same setup"
        )
    input_of_key = dict(zip(items.keys, items.inputs, strict=True))
    name_of_key = dict(zip(items.keys, items.names, strict=True))
    progress = tqdm(
        total=sum(len(batch) for batch in batches),
        unit=encoder.spec.modality,
        desc=encoder.spec.name,
        disable=not show_progress,
    )
    with torch.inference_mode(), progress:
        for batch, inputs in zip(
            batches, _batches(encoder, batches, input_of_key, config), strict=True
        ):
            vectors = encoder.encode(inputs).float().cpu().numpy()
            fault_hook.reached("batch")
            check_finite([name_of_key[key] for key in batch], vectors, encoder.spec.name)
            parts.write(batch, vectors)
            progress.update(len(batch))
    return encoder.run_record()


def _provenance(config: ExtractConfig, spec: EncoderSpec, encoder: Encoder) -> dict[str, Any]:
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
        "key_scheme": KEY_SCHEMES[spec.modality],
        "package_versions": {name: metadata.version(name) for name in RECORDED_PACKAGES},
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "extract_config": config_to_dict(config),
        "manifest": {"path": str(config.manifest), "sha256": file_key(config.manifest)},
    }


def encoder_identity(provenance: Mapping[str, Any]) -> str:
    """A hash of every provenance entry that can change a vector (encoder, weights
    fingerprint, pooling, dtype, preprocessing, device type, package versions, ...): vectors
    of equal identity are interchangeable; those of another never mix."""
    identity = {name: value for name, value in provenance.items() if name not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _reusable_file(out: Path, identity: str) -> FeatureSet | None:
    """The existing complete output, if its vectors have this run's encoder identity."""
    if not out.is_file():
        return None
    try:
        existing = read_features(out)
    except UserError as problem:
        print(f"warning: not reusing {out}: {problem}", file=sys.stderr)
        return None
    return existing if encoder_identity(existing.provenance) == identity else None


def _refuse_to_replace(out: Path, spec: EncoderSpec, items: UniqueItems) -> None:
    """Refuse to replace a complete feature file of another encoder, modality or data: a
    typo in --model or --out would throw away a finished extraction (on a GPU, hours)."""
    if not out.is_file():
        return
    try:
        existing = read_features(out)
    except UserError:  # damaged or foreign: nothing worth keeping (_reusable_file warns)
        return
    held = existing.provenance
    differences = [
        f"{name} {held.get(name)!r} (this run: {wanted!r})"
        for name, wanted in (("encoder", spec.name), ("modality", spec.modality))
        if held.get(name) != wanted
    ]
    if existing.keys and not set(existing.keys) & set(items.keys):
        differences.append("vectors of other data (no item in common with this manifest)")
    if differences:
        raise UserError(
            f"--out {out} is a complete feature file of {'; '.join(differences)}; pass "
            "--overwrite true to replace it, or choose another --out"
        )


@dataclass(frozen=True)
class _Plan:
    """What the main process found on disk and decided, for every process to follow."""

    identity: str  # the main process's encoder identity, which names the parts
    up_to_date: bool
    from_file: int  # items whose vectors the existing output already holds
    from_parts: int  # items whose batches an interrupted run finished
    pending: list[Batch]  # batches still to encode
    padding_share: float | None  # of the pending batches, for reports
    padding_share_unsorted: float | None  # the same batches cut in manifest order
    long_reports: list[str]  # names of the pending reports over the encoder's max_length


def _prepare(
    out: Path, provenance: dict[str, Any], items: UniqueItems, encoder: Encoder, batch_size: int
) -> _Plan:
    """Main process: decide what to encode, and record the plan in the parts folder."""
    identity = encoder_identity(provenance)
    parts = Parts(out, identity)
    existing = _reusable_file(out, identity)
    held = set(existing.keys if existing else ()) & set(items.keys)
    if (
        existing is not None
        and list(existing.keys) == items.keys
        and dict(existing.sources) == items.sources
        and dict(existing.skipped) == items.skipped
        and existing.provenance.get("manifest", {}).get("sha256")
        == provenance["manifest"]["sha256"]
    ):
        # Left by a run of another encoder identity, or killed while writing this file.
        parts.remove()
        out.with_name(out.name + PARTIAL_SUFFIX).unlink(missing_ok=True)
        return _Plan(identity, True, len(held), 0, [], None, None, [])
    todo = [key for key in items.keys if key not in held]
    lengths = None
    over: set[str] = set()
    if encoder.spec.modality == "text":
        text_of_key = dict(zip(items.keys, items.inputs, strict=True))
        tokens = _token_lengths(encoder, todo, [text_of_key[key] for key in todo])
        over = {key for key, length in tokens.items() if length > encoder.max_length}
        # a report's padded batch row holds at most max_length tokens
        lengths = {key: min(length, encoder.max_length) for key, length in tokens.items()}
    batches = plan_batches(todo, batch_size, parts.planned_batches(), lengths)
    parts.start(batches)
    pending = [batch for batch in batches if not parts.done(batch)]
    padding = unsorted = None
    if lengths is not None:
        pending_set = {key for batch in pending for key in batch}
        pending_keys = [key for key in todo if key in pending_set]
        padding = padding_share(pending, lengths)
        unsorted = padding_share(plan_batches(pending_keys, batch_size), lengths)
    from_parts = len(todo) - sum(len(batch) for batch in pending)
    pending_over = {key for batch in pending for key in batch} & over
    names = [name for key, name in zip(items.keys, items.names, strict=True) if key in pending_over]
    return _Plan(identity, False, len(held), from_parts, pending, padding, unsorted, names)


def _consolidate(
    out: Path, provenance: dict[str, Any], items: UniqueItems, encoder: Encoder, plan: _Plan
) -> FeatureSet:
    """Main process: the reused and the new vectors, in the order of first appearance,
    into the output file; then the parts go."""
    parts = Parts(out, plan.identity)
    row_of_key = {key: row for row, key in enumerate(items.keys)}
    vectors = np.full((len(items.keys), encoder.width), np.nan, np.float32)
    if plan.from_file:  # _prepare found the file reusable
        existing = read_features(out)
        kept = [key for key in existing.keys if key in row_of_key]
        vectors[[row_of_key[key] for key in kept]] = existing.vectors[
            existing.rows_of(kept, str(out))
        ]
    for batch in parts.planned_batches():
        vectors[[row_of_key[key] for key in batch]] = parts.read(batch)
    check_finite(items.names, vectors, f"vectors for {out}")
    features = FeatureSet(
        keys=tuple(items.keys),
        vectors=vectors,
        provenance=provenance,
        sources=items.sources,
        skipped=items.skipped,
    )
    write_features(out, features)
    parts.remove()
    return features


def run(config: ExtractConfig) -> Path:
    """Encode every unique image, report or pair of the manifest once; write the feature file.

    Resumable: finished batches are saved as parts (cache.parts) and a rerun of the same
    command encodes only the rest; vectors of the existing output are reused when their
    encoder identity matches; an output that already holds everything is left as it is.
    One run at a time writes an output (pipeline.lock). Under `accelerate launch` each
    process encodes its share of the batches into its own parts and the main process
    writes the file.

    Returns:
        The path of the feature file.

    Raises:
        UserError: an unknown or broken encoder entry, a bad manifest or, with --strict,
            bad items (all checked before any encoder loads), another run writing the same
            output, unavailable weights, an unusable device or dtype, vectors holding NaN
            or inf, or a full disk.
    """
    require_paths(config, "model", "manifest", "out")
    check_declared(config)  # also when the config was made in Python, not from flags
    if Path(config.out).is_dir():
        raise UserError(
            f"--out {config.out} is a folder; give the feature file to write, e.g. "
            f"{Path(config.out) / 'features.h5'}"
        )
    registry = load_registry(config.registry)
    spec = _resolve_spec(config, registry)
    # Reports can be re-encoded where the images are not (a laptop, another LLM). Missing
    # image files are skipped by screening like other bad ones, unless --strict.
    table = load_manifest(
        config.manifest,
        config.classes,
        check_images=spec.modality != "text",
        allow_missing_images=not config.strict,
        allow_empty_reports=not config.strict,
        labels_required=False,  # encoders never read labels: new data can be extracted
        image_root=config.image_root or None,
        labels_per_exam=config.labels_per_exam,
    )
    state = _process_state(config.device)
    out = Path(config.out)
    with ExitStack() as held:
        _on_main_process(state, lambda: held.enter_context(output_lock(out, config.wait_for_lock)))
        return _locked_run(config, spec, registry, table, state, out)


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
    plan: _Plan,
    items: UniqueItems,
    encoder: Encoder,
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """How this run went (kept apart from the vectors' provenance): per process the items
    it encoded, what was reused, skipped, padded, and the encoders' counts of long reports
    (over the reports this run encoded) summed over the processes."""
    record: dict[str, Any] = {
        "num_processes": len(encoded),
        "encoded_per_process": encoded,
        "encoded": sum(encoded),
        "reused_from_file": plan.from_file,
        "reused_from_parts": plan.from_parts,
        "skipped": len(items.skipped),
        "padding_share": plan.padding_share,
        "padding_share_unsorted": plan.padding_share_unsorted,
    }
    if encoder.tokenizer is not None:
        counts = {name: sum(each[name] for each in records) for name in LONG_REPORT_COUNTS}
        record["long_reports"] = {**records[0], **counts}
    return record


def _locked_run(
    config: ExtractConfig,
    spec: EncoderSpec,
    registry: Registry,
    table: pd.DataFrame,
    state: PartialState,
    out: Path,
) -> Path:
    """run() once this run holds the output's lock: screen, plan, encode, consolidate."""
    paths = list(table["image_path"].unique()) if spec.modality != "text" else []
    # Each process reads its share of the images; the checks (keys, reasons) are shared.
    checked = _on_every_process(
        lambda: check_images(
            paths[state.process_index :: state.num_processes],
            config.manifest,
            show_progress=state.is_main_process,
            image_root=config.image_root or None,
        ),
    )
    checks = {path: check for part in checked for path, check in part.items()}
    items = unique_items(
        table, config.manifest, spec.modality, checks, image_root=config.image_root or None
    )
    if items.skipped and config.strict:
        raise UserError(f"--strict: {_skipped_summary(items.skipped)}")
    if not items.keys:
        raise UserError(
            f"{config.manifest}: nothing to encode, every {spec.modality} item is bad: "
            f"{_skipped_summary(items.skipped)}"
        )
    if not config.overwrite:
        _on_main_process(state, lambda: _refuse_to_replace(out, spec, items))
    if state.is_main_process:
        _warn_about_broken_entries(registry, config.model)
    device = _device(config.device, state)
    encoder = load_encoder(spec, config.weights, device, torch_dtype(config.dtype, device))
    provenance = _provenance(config, spec, encoder)
    plan = _on_main_process(
        state, lambda: _prepare(out, provenance, items, encoder, config.batch_size)
    )
    if plan.up_to_date:
        if state.is_main_process:
            print(f"{out} is up to date: it holds all {len(items.keys)} {spec.modality} vectors")
            _summarise_skipped(items.skipped)
        return out
    parts = Parts(out, plan.identity)
    shares = [plan.pending[rank :: state.num_processes] for rank in range(state.num_processes)]
    records = _on_every_process(
        lambda: _encode(
            encoder,
            encoder_identity(provenance),
            shares[state.process_index],
            items,
            parts,
            config,
            state.is_main_process,
        )
    )
    encoded = [sum(len(batch) for batch in share) for share in shares]
    provenance["run"] = _run_record(encoded, plan, items, encoder, records)
    if state.is_main_process:
        features = _consolidate(out, provenance, items, encoder, plan)
        print(
            f"wrote {len(items.keys)} {spec.modality} vectors of width {features.width} "
            f"({spec.name}, {config.weights} weights) to {out}: encoded {sum(encoded)} "
            f"({' + '.join(map(str, encoded))} by {state.num_processes} process(es)), reused "
            f"{plan.from_file} from the existing file and {plan.from_parts} from parts"
        )
        if plan.padding_share is not None:
            print(
                f"padding: {plan.padding_share:.1%} of report tokens "
                f"({plan.padding_share_unsorted:.1%} without sorting by length)"
            )
        if plan.long_reports:
            print(_long_reports_summary(plan.long_reports, encoder), file=sys.stderr)
        _summarise_skipped(items.skipped)
    return out
