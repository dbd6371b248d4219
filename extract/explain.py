"""`python -m extract.explain`: where a saved head looks, as Grad-CAM heatmaps and the
pointing game.

The image goes through the frozen image encoder the head was trained on (loaded as the
head's provenance says, `--weights` as in extract), then the head's standardisation and
centring, its projector and classifier; the report vector of the pair stays fixed, read
from the cache. Grad-CAM (extract.gradcam) differentiates the target class's
log-probability with respect to the encoder's patch tokens. Like `extract.predict`, this
step needs both extract and fuse; what it knows about heads lives in fuse, about encoders
in extract.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm

from extract.encoders import Encoder, torch_dtype
from extract.gradcam import PatchTokens, on_image, patch_maps, patch_tokens_of
from extract.loaders import load_encoder
from extract.overlays import grid, overlay
from extract.pointing import describe, lesion_mask, near_baseline, score_map, summarise
from extract.predict import weights_of
from extract.preprocess import ImageTransform, decode_image, image_transform
from extract.registry import EncoderSpec, load_registry
from fuse.data import CachedRows, load_cached_rows
from fuse.head import FittedHead
from fuse.predict import decide, row_sites, score
from fuse.schema import EVALUATED_SETS, read_predictions
from pipeline.atomic import atomic_folder
from pipeline.cli import stage_main
from pipeline.config import config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.lock import output_lock
from pipeline.manifest import LINE_COLUMN

OVERLAYS_FOLDER = "overlays"
GRID_FILE = "grid.png"
POINTING_FILE = "pointing_game.csv"
POINTING_IMAGES_FILE = "pointing_game_images.csv"
SUMMARY_FILE = "explain.json"
OUTPUT_FILES = (OVERLAYS_FOLDER, GRID_FILE, POINTING_FILE, POINTING_IMAGES_FILE, SUMMARY_FILE)
REASONS = ("confident right", "confident wrong", "random")

DESCRIPTION = """\
Explain a saved head: Grad-CAM heatmaps over the image encoder's patch tokens, back through
the frozen encoder (for blip2-qformer, through the Q-Former too), the head's standardisation
and centring, its vision projector and classifier, with each pair's report vector held
fixed from the cache. Writes, into --out: overlays/*.png (each image with its heatmap, the
true and predicted class and the probability), grid.png (those overlays side by side),
pointing_game.csv (per set: how often the map's peak falls inside the lesion and how much of
its mass does, each against a random map, with patient-bootstrap 95% CIs),
pointing_game_images.csv (per image) and explain.json (all of it, for the HTML report).

Images are chosen among the head's test and external rows (its trial's split, from
--protocol's predictions table; without it, the manifest's split column): the most
confidently right, the most confidently wrong, and a random few. The lesions come from the
manifest column --mask-column: a mask image beside each image (the demo writes one) or a
box x0,y0,x1,y1 in pixels. Image encoders without patch tokens (ALIGN's EfficientNet,
ViLT's pairs) are refused. With the demo's tiny random encoders the maps say little: the
pointing game is then near its random baseline, and explain.json says so."""

EXAMPLES = """\
  python -m extract.explain --head models/M4/trial0-fold0-head.json \\
      --manifest data/demo/manifest.csv --features features/images features/reports \\
      --protocol reports/protocol --out reports/explain
  python -m extract.explain --head models/M4 --manifest data/my/manifest.csv \\
      --features my/image.h5 my/text.h5 --protocol reports/protocol --out reports/explain \\
      --weights blip2-qformer=/models/blip2-opt-2.7b --mask-column lesion_box --device cuda
"""


@dataclass(frozen=True)
class ExplainConfig:
    """Which head, which rows, which images to show and where to write."""

    head: str = setting(
        "",
        "a saved head (NAME.json or its stem), or a folder of heads (models/M4): its first "
        "*-head.json in name order is used, and the output says which",
    )
    manifest: str = setting("", "manifest CSV/Parquet of the images (and their lesion masks)")
    features: tuple[str, ...] = setting(
        (),
        "the manifest's feature files from the head's encoders (the report vectors come from "
        "here), or folders of them: a folder means every *.h5 file inside it",
    )
    protocol: str = setting(
        "",
        "protocol folder whose predictions table gives each row's split in the head's trial "
        "(python -m fuse protocol --out); empty: the manifest's split column",
    )
    out: str = setting("", f"output folder: {', '.join(OUTPUT_FILES)}")
    sets: tuple[str, ...] = setting(
        EVALUATED_SETS, "the splits whose images are shown and scored", choices=EVALUATED_SETS
    )
    target_class: str = setting(
        "", "the class whose log-probability is explained; empty: the positive (last) class"
    )
    confident_right: int = setting(
        4, "images shown per set among the right ones with the most confident decisions", at_least=0
    )
    confident_wrong: int = setting(
        4, "images shown per set among the wrong ones with the most confident decisions", at_least=0
    )
    random: int = setting(4, "images shown per set, drawn at random from the others", at_least=0)
    pointing_images: int = setting(
        200,
        "at most this many images with a lesion per set in the pointing game (a seeded random "
        "draw when there are more; 0: no pointing game)",
        at_least=0,
    )
    mask_column: str = setting(
        "lesion_mask",
        "manifest column naming each image's lesion: a mask image (nonzero = lesion, the "
        "image's size, path relative to the manifest's folder) or a box x0,y0,x1,y1; empty "
        "cells: no lesion",
    )
    weights: tuple[str, ...] = setting(
        (),
        "where the image encoder's weights are: tiny, hub or a FOLDER, or ENCODER=VALUE; "
        "empty: what extraction recorded (the weights' fingerprint must match the head's)",
    )
    device: str = setting("auto", "where the encoder runs: auto, cpu, cuda or cuda:N")
    batch_size: int = setting(8, "images per forward and backward pass", at_least=1)
    seed: int = setting(
        0, "seed of the random draws (shown images, pointing-game sample, bootstrap)"
    )
    image_root: str = setting(
        "", "folder the manifest's images may lie in (see python -m fuse protocol --help)"
    )
    wait_for_lock: float = setting(
        0, "seconds to wait while another run writes the same --out (0: refuse at once)", at_least=0
    )


def _one_head(path: str) -> tuple[FittedHead, Path, str]:
    """The head `path` names, its file, and a note when a folder held several."""
    folder = Path(path)
    if not folder.is_dir():
        return FittedHead.load(folder), folder, ""
    files = sorted(folder.glob("*-head.json"))
    if not files:
        raise UserError(f"{folder} holds no saved head (*-head.json); name a head file")
    note = (
        f"{folder} holds {len(files)} heads; explained: {files[0].name} (name one with --head "
        "FILE for another)"
        if len(files) > 1
        else ""
    )
    return FittedHead.load(files[0]), files[0], note


def image_encoder_spec(head: FittedHead) -> tuple[int, EncoderSpec, PatchTokens]:
    """The position of the head's one image input, its encoder's registry entry (with the
    pooling the head's features were extracted with) and where its patch tokens are.

    Raises:
        UserError: a probe, an exam-level head, a head without exactly one image input (a
            pair model), or an encoder without patch tokens.
    """
    if head.kind != "head":
        raise UserError(f"{head.describe()} is a probe; explain a head (*-head.json)")
    if head.scores_exams:
        raise UserError(
            f"{head.describe()} scores whole exams; explain a head of pairs (e.g. models/M4): "
            "the predictions table's attention column says which images its exam score weighs"
        )
    positions = [i for i, source in enumerate(head.sources_) if source.modality == "image"]
    if len(positions) != 1:
        kinds = ", ".join(f"{source.encoder} ({source.modality})" for source in head.sources_)
        raise UserError(
            f"{head.describe()} takes {kinds}: Grad-CAM needs exactly one image input (a pair "
            "model such as ViLT has no image-only patch tokens)"
        )
    source = head.sources_[positions[0]]
    spec = load_registry(source.extract_config.get("registry", "")).get(source.encoder)
    if source.pooling:
        spec = dataclasses.replace(spec, pooling=source.pooling)
    return positions[0], spec, patch_tokens_of(spec)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def load_image_encoder(
    head: FittedHead, weights: Sequence[str] = (), device: str = "auto"
) -> Encoder:
    """The head's image encoder, frozen, with the weights the head was trained on.

    Args:
        weights: --weights entries (VALUE, or ENCODER=VALUE); empty: what extraction recorded.

    Raises:
        UserError: see image_encoder_spec; weights whose fingerprint is not the head's.
    """
    position, spec, _ = image_encoder_spec(head)
    source = head.sources_[position]
    given = weights_of(weights, [source.encoder])[source.encoder]
    where = _device(device)
    encoder = load_encoder(
        spec,
        given or source.weights or "tiny",
        where,
        torch_dtype(source.dtype or "float32", where),
    )
    if source.weights_fingerprint and encoder.weights_fingerprint != source.weights_fingerprint:
        raise UserError(
            f"the {source.encoder} weights loaded ({encoder.weights_fingerprint[:12]}) are not "
            f"the ones {head.describe()} was trained on ({source.weights_fingerprint[:12]}): "
            "pass --weights with the head's weights"
        )
    encoder.model.requires_grad_(False)
    return encoder


def _splits(config: ExplainConfig, head: FittedHead, data: CachedRows) -> pd.Series:
    """Each row's split in the head's trial: from the predictions table, or the manifest."""
    table = data.table
    if not config.protocol:
        return table["split"]
    predictions = read_predictions(config.protocol, head.classes)
    mine = predictions[
        (predictions["model"] == head.model.name)
        & (predictions["head"] == head.kind)
        & (predictions["trial"] == head.origin.get("trial"))
        & (predictions["fold"] == head.origin.get("fold"))
    ]
    if mine.empty:
        raise UserError(
            f"{config.protocol}'s predictions hold no rows of {head.describe()}; give the "
            "protocol folder that saved this head"
        )
    split_of = mine.drop_duplicates(["image_path", "exam_id"]).set_index(["image_path", "exam_id"])[
        "split"
    ]
    keys = pd.MultiIndex.from_frame(table[["image_path", "exam_id"]])
    return pd.Series(split_of.reindex(keys).fillna("").to_numpy(), index=table.index)


def _chosen(
    config: ExplainConfig, rows: pd.DataFrame, rng: np.random.Generator
) -> list[tuple[int, str]]:
    """(row, reason) of the images shown from one set's `rows` (with columns decision,
    confidence and label)."""
    labelled = rows["label"] != ""
    right = rows[labelled & (rows["decision"] == rows["label"])]
    wrong = rows[labelled & (rows["decision"] != rows["label"])]
    chosen = [
        *((row, REASONS[0]) for row in right.nlargest(config.confident_right, "confidence").index),
        *((row, REASONS[1]) for row in wrong.nlargest(config.confident_wrong, "confidence").index),
    ]
    taken = {row for row, _ in chosen}
    others = [row for row in rows.index if row not in taken]
    drawn = rng.choice(others, size=min(config.random, len(others)), replace=False)
    return chosen + [(int(row), REASONS[2]) for row in sorted(drawn)]


def _pointing_rows(
    config: ExplainConfig, rows: pd.DataFrame, rng: np.random.Generator
) -> list[int]:
    """One set's rows with a lesion, at most pointing_images of them (a seeded draw)."""
    if config.mask_column not in rows:
        return []
    with_lesion = rows.index[rows[config.mask_column].str.strip() != ""].to_numpy()
    if len(with_lesion) > config.pointing_images:
        with_lesion = np.sort(rng.choice(with_lesion, config.pointing_images, replace=False))
    return [int(row) for row in with_lesion]


class Explainer:
    """Grad-CAM maps of rows of the cached data, through one head and its image encoder.

    Args:
        head: a saved head (see image_encoder_spec for which).
        data: the cached rows; every input but the image is read from here.
        encoder: the head's image encoder (load_image_encoder).
        target: the index of the class whose log-probability is explained.
    """

    def __init__(self, head: FittedHead, data: CachedRows, encoder: Encoder, target: int) -> None:
        self.position, _, self.tokens = image_encoder_spec(head)
        self.head, self.data, self.encoder, self.target = head, data, encoder, target
        self.transform: ImageTransform = image_transform(encoder.preprocessing)
        self.sites = row_sites(data.table, head, "stored")
        self.largest_vector_difference = 0.0  # recomputed image vectors against the cache

    def maps(
        self, rows: Sequence[int], images: Sequence[Image.Image]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Each row's map on its image's pixels, and its positive-class probability."""
        pixels = torch.stack([self.transform(image) for image in images])
        inputs = [self.data.features[feature][list(rows)] for feature in self.head.model.inputs]
        sites = [self.sites[row] for row in rows]
        positives: list[torch.Tensor] = []

        def log_probability(vectors: torch.Tensor) -> torch.Tensor:
            given = [vectors.float() if i == self.position else x for i, x in enumerate(inputs)]
            logits, _ = self.head.network_(self.head.prepared(given, sites, "stored"))
            log_probabilities = F.log_softmax(logits.float(), dim=-1)
            positives.append(log_probabilities[:, -1].detach().exp())
            return log_probabilities[:, self.target]

        grids, vectors = patch_maps(
            self.encoder.model,
            self.tokens,
            self.encoder.encode,
            self.encoder.pixels(pixels),
            log_probability,
        )
        cached = inputs[self.position]
        self.largest_vector_difference = max(
            self.largest_vector_difference,
            float(
                (vectors.float().cpu() - cached).abs().max() / cached.abs().max().clamp(min=1e-12)
            ),
        )
        on_images = [
            on_image(grid_map, self.transform, image.size)
            for grid_map, image in zip(grids, images, strict=True)
        ]
        return on_images, positives[0].cpu().numpy()


def _pointing_record(record: pd.Series, heatmap: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """One image's row of the pointing game (NaN results for a map that is zero everywhere)."""
    result = score_map(heatmap, mask)
    return {
        "set": record["set"],
        "image_path": record["image_path"],
        "patient_id": record["patient_id"],
        "label": record["label"],
        "hit": result.hit if result else np.nan,
        "mass_inside": result.mass_inside if result else np.nan,
        "area_share": float(mask.mean()),
    }


def _gallery_entry(
    record: pd.Series, index: int, reason: str, predicted: str, positive: float
) -> dict[str, Any]:
    """The gallery's record of one overlay (explain.json)."""
    stem = Path(record["image_path"]).stem
    return {
        "image": f"{OVERLAYS_FOLDER}/{index:02d}-{reason.replace(' ', '-')}-{stem}.png",
        "image_path": record["image_path"],
        "patient_id": record["patient_id"],
        "exam_id": record["exam_id"],
        "split": record["set"],
        "label": record["label"],
        "predicted": predicted,
        "probability": float(positive),
        "reason": reason,
    }


def _image_file(data: CachedRows, manifest: Path, root: str, row: int) -> Path:
    return (Path(root) if root else manifest.parent) / data.table.at[row, "image_path"]


def run(config: ExplainConfig) -> dict[str, Any]:
    """Explain the head on the chosen images; write the overlays, grid, pointing game and
    explain.json into --out (atomically, under its lock)."""
    require_paths(config, "head", "manifest", "features", "out")
    head, head_file, head_note = _one_head(config.head)
    _, spec, _ = image_encoder_spec(head)  # refuses an encoder without patch tokens at once
    classes = head.classes
    target_name = config.target_class or classes[-1]
    if target_name not in classes:
        raise UserError(
            f"--target-class {target_name}: the head's classes are {', '.join(classes)}"
        )
    out = Path(config.out)
    with ExitStack() as outputs:
        outputs.enter_context(output_lock(out, config.wait_for_lock))
        staging = outputs.enter_context(atomic_folder(out, owned=OUTPUT_FILES))
        return _run_locked(
            config,
            head,
            head_file,
            head_note,
            spec,
            classes.index(target_name),
            staging,
        )


def _run_locked(
    config: ExplainConfig,
    head: FittedHead,
    head_file: Path,
    head_note: str,
    spec: EncoderSpec,
    target: int,
    staging: Path,
) -> dict[str, Any]:
    classes = head.classes
    data = load_cached_rows(
        config.manifest,
        config.features,
        head.model.inputs,
        classes,
        image_root=config.image_root or None,
        labels_required=False,
    )
    probabilities, threshold = score([head], data, "stored", "youden")
    table = data.table.assign(
        set=_splits(config, head, data),
        positive=probabilities[:, -1],
        decision=decide(probabilities[:, -1], threshold, classes),
    )
    table["confidence"] = np.where(
        table["decision"] == classes[-1], table["positive"], 1 - table["positive"]
    )
    rng = np.random.default_rng(config.seed)
    gallery: list[tuple[int, str]] = []
    pointing: list[int] = []
    for name in config.sets:
        rows = table[table["set"] == name]
        gallery += _chosen(config, rows, rng)
        pointing += _pointing_rows(config, rows, rng)
    if not table["set"].isin(config.sets).any():
        raise UserError(
            f"no row of {config.manifest} is in the sets {', '.join(config.sets)}"
            + ("" if config.protocol else "; give --protocol for the head's own split")
        )
    if not gallery and not pointing:
        raise UserError(
            "nothing to explain: --confident-right, --confident-wrong, --random and "
            "--pointing-images are all 0 (or no image has a lesion to point at)"
        )
    encoder = load_image_encoder(head, config.weights, config.device)
    explainer = Explainer(head, data, encoder, target)
    manifest = Path(config.manifest)
    reasons = dict(gallery)
    wanted = list(dict.fromkeys([row for row, _ in gallery] + pointing))
    (staging / OVERLAYS_FOLDER).mkdir()
    overlays, entries, scored = [], [], []
    with tqdm(total=len(wanted), unit="image", desc="explain") as progress:
        for start in range(0, len(wanted), config.batch_size):
            batch = wanted[start : start + config.batch_size]
            images = [
                decode_image(_image_file(data, manifest, config.image_root, row)) for row in batch
            ]
            maps, positives = explainer.maps(batch, images)
            for row, image, heatmap, positive in zip(batch, images, maps, positives, strict=True):
                record = table.loc[row]
                mask = lesion_mask(
                    str(record.get(config.mask_column, "") or ""),
                    manifest.parent,
                    image.size,
                    f"manifest {manifest}, line {record[LINE_COLUMN]}",
                )
                if row in pointing and mask is not None:
                    scored.append(_pointing_record(record, heatmap, mask))
                if row in reasons:
                    predicted = classes[-1] if positive >= threshold else classes[0]
                    entry = _gallery_entry(record, len(entries), reasons[row], predicted, positive)
                    picture = overlay(
                        image,
                        heatmap,
                        [
                            f"true {record['label'] or '?'}  predicted {predicted}  "
                            f"P({classes[-1]}) {positive:.2f}",
                            f"{reasons[row]}, {record['set']}: {Path(record['image_path']).name}",
                        ],
                        mask,
                    )
                    picture.save(staging / entry["image"])
                    overlays.append(picture)
                    entries.append(entry)
            progress.update(len(batch))
    if overlays:
        grid(overlays).save(staging / GRID_FILE)
    about = {
        "head": head.describe(),
        "model": head.model.name,
        "trial": head.origin.get("trial"),
        "fold": head.origin.get("fold"),
    }
    images = pd.DataFrame(
        scored,
        columns=["set", "image_path", "patient_id", "label", "hit", "mass_inside", "area_share"],
    )
    pointing_rows = summarise(images, about, config.seed) if len(images) else []
    images.to_csv(staging / POINTING_IMAGES_FILE, index=False)
    pd.DataFrame(pointing_rows).to_csv(staging / POINTING_FILE, index=False)
    notes = _notes(config, head, head_file, head_note, spec, explainer, pointing_rows, data)
    summary = {
        "head": {**about, "file": str(head_file), "description": head.describe()},
        "encoder": {
            "name": spec.name,
            "loader": spec.loader,
            "pooling": spec.pooling,
            "weights": encoder.weights.kind,
            "weights_fingerprint": encoder.weights_fingerprint,
            "patch_tokens": dataclasses.asdict(explainer.tokens),
        },
        "target_class": classes[target],
        "probability_of": classes[-1],  # each gallery entry's probability is of this class
        "threshold": threshold,
        "gallery": entries,
        "pointing_game": pointing_rows,
        "notes": notes,
        "settings": config_to_dict(config),
    }
    (staging / SUMMARY_FILE).write_text(
        json.dumps(_plain(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(entries)} overlays and the pointing game of {len(images)} images")
    return summary


def _notes(
    config: ExplainConfig,
    head: FittedHead,
    head_file: Path,
    head_note: str,
    spec: EncoderSpec,
    explainer: Explainer,
    pointing_rows: list[dict[str, Any]],
    data: CachedRows,
) -> list[str]:
    notes = [
        f"Explained: {head.describe()} ({head_file}); Grad-CAM of the {spec.name} encoder's "
        "patch tokens at its last block's input, for the log-probability of the target class, "
        "with each pair's report vector fixed from the cache.",
        "Random-map baselines: a uniformly random peak falls inside the lesion with probability "
        "equal to the lesion's share of the image's pixels, and a map of independent, "
        "identically distributed values puts that share of its mass inside in expectation; "
        "both baselines are the mean lesion area share of the images scored.",
        f"Probabilities on the overlays come from this float32 pass through the encoder and "
        f"head; the recomputed image vectors differ from the cached ones by at most "
        f"{explainer.largest_vector_difference:.1e} of their largest value.",
        *data.notes,
    ]
    if head_note:
        notes.insert(0, head_note)
    if not head.inputs_used_[explainer.position]:
        notes.insert(
            0,
            "This head does not read the image: selection on validation kept the report "
            "alone (modality_dropout), so every map is 0; explain another trial's head.",
        )
    if explainer.transform.crop_size:
        notes.append(
            f"{spec.name} sees a centre crop: outside it the map is 0 (the encoder never saw "
            "those pixels), and a lesion there cannot be pointed at."
        )
    if not config.protocol:
        notes.append("Splits are the manifest's split column (no --protocol given).")
    if config.mask_column not in data.table:
        notes.append(f"The manifest has no column {config.mask_column!r}: no pointing game.")
    notes += describe(pointing_rows)
    if explainer.encoder.weights.kind == "tiny":
        notes.append(
            "The encoder has tiny random weights (the demo's): its patch tokens carry little "
            "of the image, so the heatmaps say little and the pointing game is expected near "
            "its random baseline. With real weights the same command needs no change."
        )
    elif pointing_rows and all(near_baseline(row) for row in pointing_rows):
        notes.append("The pointing game is near its random baseline in every set.")
    return notes


def _plain(value: Any) -> Any:
    """`value` as JSON a browser reads: numpy scalars as numbers, NaN as null."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags and explain the head."""
    stage_main(
        ExplainConfig,
        run,
        prog="python -m extract.explain",
        section="explain",
        description=DESCRIPTION,
        examples=EXAMPLES,
        argv=argv,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
