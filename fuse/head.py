"""A fitted head: everything between cached vectors and a decision, which can be saved,
loaded and applied to new exams.

It has the estimator shape scikit-learn users know: the constructor stores settings,
`fit` sets the trailing-underscore attributes (standardisation statistics, each external
site's centring shift, the network or the probe's weights, the validation thresholds),
`predict_proba` applies all of them. The trained network (kind "head") and the
logistic-regression probe (kind "probe") share this interface, so predict, analyses and
explanations never ask which one they hold. Nor whether it scores pairs or whole exams:
callers pass each row's exam, an exam-level head (fuse.exam_model) trains and scores one
sample per exam and gives every row its exam's probability.

Saved as a file pair that cannot run code on load, Hugging Face's habit: tensors in
`NAME.safetensors`, everything else in `NAME.json`, with a format name and version that
the loader checks.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fuse.exam_model import (
    ExamFusionHead,
    ExamLayout,
    exam_batch_size,
    exam_inputs,
    exam_means,
    predict_exams,
)
from fuse.model import FusionHead
from fuse.probe import ProbeFit, fit_probe
from fuse.train import (
    HeadSettings,
    TrainedHead,
    predict_proba,
    resolve_precision,
    train_head,
    with_absent,
)
from fuse.zoo import EXAM_HEAD, PROJECTED_HEADS, ModelSpec
from pipeline.clinical import ClinicalColumns, ClinicalEncoding
from pipeline.errors import UserError
from pipeline.metrics import (
    choose_threshold,
    threshold_for_sensitivity,
    threshold_for_specificity,
)

HEAD_FORMAT = "vlmf-head"
HEAD_FORMAT_VERSION = 1
KINDS = ("head", "probe")
CENTRING = {
    "stored": "rows of an external site seen by the protocol get that site's stored shift "
    "(computed there from the site's own vectors, no labels); other rows as they are",
    "batch": "each site of the rows given that is not a training site is shifted so its "
    "mean is the training rows' mean, from these rows' own vectors (a calibration batch "
    "of the new site: use many of its exams, not one)",
    "none": "every row as it is",
}
TENSOR_SUFFIX, CONFIG_SUFFIX = ".safetensors", ".json"
# Provenance that must match between a head and the features it is applied to.
IDENTITY_FIELDS = ("encoder", "modality", "width", "weights_fingerprint", "pooling")


@dataclass(frozen=True)
class FeatureSource:
    """What one input of a head was: the feature file's provenance that defines its vectors."""

    encoder: str
    modality: str
    width: int
    weights: str | None  # tiny, hub or a folder, as extraction was told
    weights_fingerprint: str | None
    pooling: str | None
    dtype: str | None
    extract_config: Mapping[str, Any]  # how extraction ran, to run it again for a new exam

    @classmethod
    def from_provenance(cls, provenance: Mapping[str, Any], width: int) -> FeatureSource:
        """The source of vectors of `width` from a feature file's provenance."""
        return cls(
            encoder=str(provenance.get("encoder")),
            modality=str(provenance.get("modality")),
            width=int(width),
            weights=provenance.get("weights"),
            weights_fingerprint=provenance.get("weights_fingerprint"),
            pooling=provenance.get("pooling"),
            dtype=provenance.get("dtype"),
            extract_config=dict(provenance.get("extract_config") or {}),
        )

    def describe(self) -> str:
        """One phrase naming the vectors, e.g. "1024-d blip2-qformer image (weights ab12...,
        pooling mean)"."""
        fingerprint = (self.weights_fingerprint or "unrecorded")[:12]
        return (
            f"{self.width}-d {self.encoder} {self.modality} (weights {fingerprint}, "
            f"pooling {self.pooling})"
        )


class FittedHead:
    """A head of one model of the protocol, or its probe.

    Args:
        model: which model (features and head type) this is.
        kind: "head" (the trained network) or "probe" (L2 logistic regression).
        settings: the network's architecture and optimisation (unused by a probe).
        classes: class names, negative first.
        standardise: z-score each input with the training rows' statistics.
        centre_external: store a centring shift for each external site given to `fit`.
        target_sensitivity, target_specificity: the rates the stored operating points
            reach on validation.
        origin: where the head comes from (trial, fold, seed, ...), kept with it.
        clinical: the clinical columns of a model that takes them (`model.clinical`); the
            encoding fitted on the training rows (`clinical_`) is its last input.
    """

    def __init__(
        self,
        model: ModelSpec,
        kind: str = "head",
        settings: HeadSettings | None = None,
        classes: Sequence[str] = ("VCD", "GC"),
        standardise: bool = True,
        centre_external: bool = True,
        target_sensitivity: float = 0.95,
        target_specificity: float = 0.95,
        origin: Mapping[str, Any] | None = None,
        clinical: ClinicalColumns | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: choose from {KINDS}")
        self.model = model
        self.kind = kind
        # A saved head records the precision it trained with, not "auto".
        self.settings = resolve_precision(settings or HeadSettings())
        self.classes = tuple(classes)
        self.standardise = standardise
        self.centre_external = centre_external
        self.target_sensitivity = target_sensitivity
        self.target_specificity = target_specificity
        self.origin = dict(origin or {})
        self.clinical = clinical if model.clinical else None

    # Fitting

    def fit(
        self,
        inputs: Sequence[torch.Tensor],
        labels: torch.Tensor,
        train_rows: torch.Tensor,
        val_rows: torch.Tensor,
        seed: int,
        *,
        sources: Sequence[FeatureSource],
        report_groups: torch.Tensor | None = None,
        external_sites: Mapping[str, torch.Tensor] | None = None,
        training_sites: Sequence[str] = (),
        table: pd.DataFrame | None = None,
        exams: Sequence | np.ndarray | None = None,
    ) -> FittedHead:
        """Fit on `train_rows`, choose the epoch (or C) and the thresholds on `val_rows`
        (an exam-level head: on their exams, one sample and one score each).

        Args:
            inputs: row-aligned raw vectors, one matrix per input of the model.
            labels: [rows] class indices (only train and val rows are read).
            seed: initialisation, batch order and the probe's tie-breaking.
            sources: the provenance of each input's vectors.
            report_groups: [rows]; rows sharing a report are not NT-Xent negatives.
            external_sites: rows of each external site, whose own vectors (never their
                labels) give the site's centring shift.
            training_sites: the sites of the training rows, which are never shifted.
            exams: each row's exam (any hashable id); needed by an exam-level head, which
                takes whole exams (a split never cuts one), unused by the others.
            table: the manifest rows, row-aligned with `inputs`: their clinical columns
                are read by a model that takes them (and never standardised or centred
                as the vectors are: the encoding does its own, and a hospital's older
                patients are not a camera's offset).
        """
        if len(sources) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(sources)} sources")
        self.clinical_ = None
        if self.model.clinical:
            if not (self.clinical and self.clinical.columns):
                raise UserError(
                    f"{self.model.name} takes clinical variables: declare clinical_numeric "
                    "or clinical_categorical (manifest columns)"
                )
            if table is None:
                raise ValueError(f"{self.model.name} reads its clinical columns from `table`")
            self.clinical_ = ClinicalEncoding.fit(table.iloc[train_rows.numpy()], self.clinical)
        self.sources_ = tuple(sources)
        self.training_sites_ = tuple(dict.fromkeys(training_sites))
        self.standardisation_ = (
            [
                {"mean": train.mean(dim=0), "sd": train.std(dim=0).clamp(min=1e-6)}
                for train in (vectors[train_rows] for vectors in inputs)
            ]
            if self.standardise
            else None
        )
        standardised = self._standardised(inputs)
        self.train_mean_ = [vectors[train_rows].mean(dim=0) for vectors in standardised]
        self.site_shifts_ = {
            site: [
                mean - vectors[rows].mean(dim=0)
                for mean, vectors in zip(self.train_mean_, standardised, strict=True)
            ]
            for site, rows in (external_sites or {}).items()
            if self.centre_external and len(rows)
        }
        ready = _shifted(
            standardised,
            {
                site: rows
                for site, rows in (external_sites or {}).items()
                if site in self.site_shifts_
            },
            self.site_shifts_,
        ) + self._clinical_input(table)
        # The stand-in for an input that selection leaves out, as train_head computes it.
        self.absent_ = [vectors[train_rows].float().mean(dim=0) for vectors in ready]
        groups = report_groups if report_groups is not None else torch.arange(len(labels))
        layout = self._layout(exams, len(labels))
        samples = self._samples(ready, layout)
        if layout is not None:  # an exam's label and report are its first row's
            labels, groups = labels[layout.first_rows], groups[layout.first_rows]
            train_rows, val_rows = layout.exams_of(train_rows), layout.exams_of(val_rows)
        if self.kind == "head":
            trained = self._train_network(
                samples, labels, groups, train_rows, val_rows, seed, layout
            )
            self.network_ = trained.model
            # the exam head's samples end with the mask, which no selection drops
            self.inputs_used_ = trained.inputs_used[: len(ready)]
            self.training_ = {
                "best_epoch": trained.best_epoch,
                "first_eligible_epoch": trained.first_eligible_epoch,
                "epochs_trained": trained.epochs_trained,
                "fallback_to_last_epoch": trained.fallback,
            }
            names = self.input_names()
            self.history_ = [  # which inputs each epoch's selected variant read, by name
                {**record, "inputs_used": _used_names(names, record["inputs_used"][: len(names)])}
                for record in trained.history
            ]
        else:
            self.probe_ = fit_probe(samples, labels, train_rows, val_rows, seed)
            self.inputs_used_ = (True,) * len(ready)
            self.training_ = {"probe_c": self.probe_.c, "probe_val_loss": self.probe_.val_loss}
            self.history_ = []
        # Scored as the table scores them (all rows, or exams, at once), so the thresholds
        # are cuts on exactly the numbers the table holds.
        val_scores = self._scored(self._samples(self._gated(ready), layout))[0][
            val_rows.numpy(), -1
        ]
        val_labels = labels[val_rows].numpy()
        self.thresholds_ = {
            "youden": choose_threshold(val_labels, val_scores),
            "0.5": 0.5,
            "sensitivity": threshold_for_sensitivity(
                val_labels, val_scores, self.target_sensitivity
            ),
            "specificity": threshold_for_specificity(
                val_labels, val_scores, self.target_specificity
            ),
        }
        return self

    def _train_network(
        self,
        samples: Sequence[torch.Tensor],
        labels: torch.Tensor,
        groups: torch.Tensor,
        train: torch.Tensor,
        val: torch.Tensor,
        seed: int,
        layout: ExamLayout | None,
    ) -> TrainedHead:
        torch.manual_seed(seed)
        network = self._network()
        settings = self.settings
        if layout is not None:
            # batch_size counts pairs for every head; modality dropout replaces one pair's
            # input, which has no exam-level counterpart here yet, so the exam head trains
            # on every input (README, Exam-level model)
            settings = dataclasses.replace(
                settings,
                batch_size=exam_batch_size(settings.batch_size, layout, train),
                modality_dropout=0.0,
            )
        return train_head(network, samples, labels, groups, train, val, settings, seed)

    @property
    def scores_exams(self) -> bool:
        """Whether this head scores whole exams (one sample per exam) rather than pairs."""
        return self.model.head == EXAM_HEAD

    def _per_image(self) -> list[bool]:
        """Per input, whether it holds one vector per image (pooled over an exam)."""
        return [modality == "image" for _, modality in self.model.inputs]

    def _layout(self, exams: Sequence | np.ndarray | None, rows: int) -> ExamLayout | None:
        """The rows' exams for an exam-level head; None for a head of pairs."""
        if not self.scores_exams:
            return None
        if exams is None or len(exams) != rows:
            raise ValueError(
                f"{self.describe()} scores whole exams: pass each of the {rows} rows' exam "
                "(exams=fuse.exam_model.exam_ids(table))"
            )
        return ExamLayout.of(exams)

    def _samples(
        self, prepared: Sequence[torch.Tensor], layout: ExamLayout | None
    ) -> list[torch.Tensor]:
        """What the network or probe takes: the rows, or one sample per exam (the probe of
        an exam-level model takes the exam's mean vectors)."""
        if layout is None:
            return list(prepared)
        if self.kind == "probe":
            return [exam_means(vectors, layout) for vectors in prepared]
        return exam_inputs(prepared, layout, self._per_image())

    def _network(self) -> FusionHead:
        """A fresh network for the head's inputs: its sources, then the clinical encoding."""
        return self.network_for(
            [source.width for source in self.sources_],
            self.clinical_.width if self.clinical_ is not None else None,
        )

    def network_for(self, widths: Sequence[int], clinical_width: int | None = None) -> FusionHead:
        """A fresh network, as `fit` builds it, for inputs of these widths (in the model's
        order) and, when given, a clinical encoding of `clinical_width` as the last input.
        Built under `torch.device("meta")` it allocates nothing: a way to count its weights
        before fitting."""
        inputs = [
            (f"{modality}{position}", modality, width)
            for position, ((_, modality), width) in enumerate(
                zip(self.model.inputs, widths, strict=True)
            )
        ]
        if clinical_width is not None:
            inputs.append(("clinical", "clinical", clinical_width))
        projection_of = {
            "image": self.settings.image_projection,
            "text": self.settings.text_projection,
            "clinical": self.settings.clinical_projection,
        }
        vlmf = self.model.head in PROJECTED_HEADS
        fusion = dict(
            input_widths={name: width for name, _, width in inputs},
            projections=(
                {name: projection_of[modality] for name, modality, _ in inputs} if vlmf else {}
            ),
            hidden_widths=self.settings.hidden_widths,
            dropout=self.settings.dropout,
            num_classes=len(self.classes),
            contrastive_width=self.settings.contrastive_width if vlmf else 0,
            unpaired=("clinical",),
        )
        if self.scores_exams:
            (pooled,) = (name for name, modality, _ in inputs if modality == "image")
            return ExamFusionHead(
                pooled=pooled, attention_width=self.settings.attention_width, **fusion
            )
        return FusionHead(**fusion)

    def _clinical_input(self, table: pd.DataFrame | None) -> list[torch.Tensor]:
        """The encoded clinical variables as one more input; none for a head without them."""
        if self.clinical_ is None:
            return []
        if table is None:  # a caller's slip, not the user's
            raise ValueError(
                f"this {self.model.name} {self.kind} takes the clinical columns "
                f"{', '.join(self.clinical_.columns.columns)}: pass the manifest rows as `table`"
            )
        return [torch.from_numpy(self.clinical_.encode(table))]

    # Applying

    @property
    def threshold_(self) -> float:
        """The validation cut that maximises Youden's J: the default operating point."""
        return self.thresholds_["youden"]

    def _check_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise RuntimeError("this head is not fitted: call fit() or FittedHead.load()")

    def _standardised(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.standardisation_ is None:
            return [vectors.float() for vectors in inputs]
        return [
            (vectors.float() - stats["mean"]) / stats["sd"]
            for vectors, stats in zip(inputs, self.standardisation_, strict=True)
        ]

    def _gated(self, prepared: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs that selection left out (see HeadSettings.modality_dropout) at their
        training mean, the stand-in the head was trained with."""
        return with_absent(prepared, self.absent_, self.inputs_used_)

    def _batch_shifts(
        self, standardised: Sequence[torch.Tensor], sites: Sequence[str]
    ) -> dict[str, list[torch.Tensor]]:
        site_array = np.asarray(sites, dtype=object)
        return {
            site: [
                mean - vectors[torch.from_numpy(site_array == site)].mean(dim=0)
                for mean, vectors in zip(self.train_mean_, standardised, strict=True)
            ]
            for site in dict.fromkeys(sites)
            if site is not None and site not in self.training_sites_
        }

    def prepared(
        self,
        inputs: Sequence[torch.Tensor],
        sites: Sequence[str | None] | None = None,
        centring: str = "stored",
        table: pd.DataFrame | None = None,
    ) -> list[torch.Tensor]:
        """The head's own inputs: standardised, and centred per site as `centring` says,
        then the encoded clinical variables of a head that takes them.

        Args:
            inputs: raw vectors, one matrix per input, in the model's order.
            sites: each row's site; None (or a None entry) leaves rows uncentred.
            centring: a key of CENTRING.
            table: the manifest rows, row-aligned with `inputs` (read for clinical columns).
        """
        self._check_fitted()
        if centring not in CENTRING:
            raise UserError(f"centring {centring!r}: choose from {', '.join(CENTRING)}")
        self.check_widths([vectors.shape[1] for vectors in inputs])
        standardised = self._standardised(inputs)
        clinical = self._clinical_input(table)
        if sites is None or centring == "none":
            return self._gated(standardised + clinical)
        if centring == "batch":
            shifts = self._batch_shifts(standardised, sites)
        else:
            shifts = self.site_shifts_
        site_array = np.asarray(sites, dtype=object)
        rows_of_site = {
            site: torch.from_numpy(np.flatnonzero(site_array == site))
            for site in shifts
            if (site_array == site).any()
        }
        return self._gated(_shifted(standardised, rows_of_site, shifts) + clinical)

    def _scored(self, samples: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities [samples, classes], and the attention weights [exams, slots] of an
        exam-level network (None otherwise)."""
        if self.kind == "probe":
            return self.probe_.predict_proba(torch.cat(list(samples), dim=1).numpy()), None
        if self.scores_exams:
            return predict_exams(self.network_, samples, self.settings.precision)
        return predict_proba(self.network_, samples, self.settings.precision), None

    def scores_of_prepared(
        self, prepared: Sequence[torch.Tensor], exams: Sequence | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities [rows, classes] of inputs already `prepared`, and each row's
        attention weight in its exam [rows] (NaN but for an exam-level network).

        Args:
            exams: each row's exam (see `fit`); an exam-level head scores the exams of the
                rows given, on those rows, and gives every row its exam's probability.
        """
        self._check_fitted()
        rows = len(prepared[0])
        layout = self._layout(exams, rows)
        probabilities, attention = self._scored(self._samples(prepared, layout))
        if layout is not None:
            probabilities = probabilities[layout.exam_of_row.numpy()]
        if attention is None:
            return probabilities, np.full(rows, np.nan, dtype=np.float32)
        return probabilities, layout.per_row(torch.from_numpy(attention)).numpy()

    def probabilities_of_prepared(
        self, prepared: Sequence[torch.Tensor], exams: Sequence | np.ndarray | None = None
    ) -> np.ndarray:
        """Class probabilities [rows, classes] of inputs already `prepared`: for analyses
        that change the head's own inputs (occlusion, swapped reports)."""
        return self.scores_of_prepared(prepared, exams)[0]

    def attribution_shares(
        self, prepared: Sequence[torch.Tensor], exams: Sequence | np.ndarray | None = None
    ) -> np.ndarray:
        """Each input's share [rows, inputs] of the positive log-odds, gradient x input on
        the vector the classifier reads (the probe: its weights x its inputs), summed per
        input; shares are absolute values normalised to sum to 1 per row (an exam-level
        head's: its exam's, on the pooled image and the report)."""
        self._check_fitted()
        layout = self._layout(exams, len(prepared[0]))
        samples = self._samples(prepared, layout)
        if self.kind == "head":
            parts = [
                part.detach().requires_grad_(True)
                for part in self.network_.eval().fused_parts([x.float() for x in samples])
            ]
            logits = self.network_.classifier(torch.cat(parts, dim=-1))
            (logits[:, -1] - logits[:, 0]).sum().backward()
            sums = torch.stack([(part.grad * part).sum(dim=1) for part in parts], dim=1)
            contributions = sums.detach().numpy()
        else:
            coef = self.probe_.coef
            log_odds_weights = coef[-1] - coef[0] if len(coef) > 1 else coef[0]
            features = torch.cat(list(samples), dim=1).double().numpy() * log_odds_weights
            bounds = np.cumsum([0, *(vectors.shape[1] for vectors in samples)])
            contributions = np.stack(
                [features[:, start:end].sum(axis=1) for start, end in itertools.pairwise(bounds)],
                axis=1,
            )
        magnitude = np.abs(contributions)
        shares = magnitude / np.maximum(magnitude.sum(axis=1, keepdims=True), 1e-12)
        return shares if layout is None else shares[layout.exam_of_row.numpy()]

    def predict_with_attention(
        self,
        inputs: Sequence[torch.Tensor],
        sites: Sequence[str | None] | None = None,
        centring: str = "stored",
        exams: Sequence | np.ndarray | None = None,
        table: pd.DataFrame | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities [rows, classes] of raw vectors (see `prepared`), and each
        row's attention weight in its exam (see scores_of_prepared)."""
        return self.scores_of_prepared(self.prepared(inputs, sites, centring, table), exams)

    def predict_proba(
        self,
        inputs: Sequence[torch.Tensor],
        sites: Sequence[str | None] | None = None,
        centring: str = "stored",
        exams: Sequence | np.ndarray | None = None,
        table: pd.DataFrame | None = None,
    ) -> np.ndarray:
        """Class probabilities [rows, classes] of raw vectors (see predict_with_attention)."""
        return self.predict_with_attention(inputs, sites, centring, exams, table)[0]

    # Checks

    def check_widths(self, widths: Sequence[int]) -> None:
        """Raise a UserError when the inputs' widths are not the ones the head was fitted on."""
        expected = [source.width for source in self.sources_]
        if list(widths) != expected:
            raise UserError(
                f"features are {'/'.join(map(str, widths))}-d; this {self.model.name} "
                f"{self.kind} was trained on {'/'.join(map(str, expected))}-d "
                f"({', '.join(source.describe() for source in self.sources_)})"
            )

    def check_sources(self, sources: Sequence[FeatureSource], where: Sequence[str]) -> None:
        """Raise a UserError naming both sides when features are not the head's kind.

        Args:
            sources: the provenance of the features to score, one per input.
            where: the file each came from, for the message.
        """
        self._check_fitted()
        for ours, theirs, path in zip(self.sources_, sources, where, strict=True):
            differing = [
                field for field in IDENTITY_FIELDS if getattr(ours, field) != getattr(theirs, field)
            ]
            if differing:
                raise UserError(
                    f"{path} holds {theirs.describe()}; this {self.model.name} {self.kind} "
                    f"was trained on {ours.describe()} ({', '.join(differing)} differ): "
                    "extract the features with the head's encoder and weights"
                )
            if ours.dtype != theirs.dtype:
                print(
                    f"warning: {path} was extracted in {theirs.dtype}; the head's features "
                    f"were {ours.dtype}: probabilities may differ slightly",
                    file=sys.stderr,
                )

    def input_names(self) -> list[str]:
        """Each input's name, in the order the network takes them: modalities, clinical."""
        names = [modality for _, modality in self.model.inputs]
        return names + (["clinical"] if getattr(self, "clinical_", None) is not None else [])

    def describe(self) -> str:
        """ "M4 head (trial 0, fold 0)", and "; reads image only" where selection left an
        input out."""
        where = ", ".join(
            f"{key} {value}" for key, value in self.origin.items() if key in ("trial", "fold")
        )
        used = getattr(self, "inputs_used_", ())
        if used and not all(used):
            reads = f"reads {_used_names(self.input_names(), used)} only"
            where = f"{where}; {reads}" if where else reads
        return f"{self.model.name} {self.kind}" + (f" ({where})" if where else "")

    # Saving

    def save(self, path: str | Path) -> Path:
        """Write NAME.safetensors and NAME.json (atomically each); return the JSON's path.

        Args:
            path: the pair's name, with or without a suffix.
        """
        self._check_fitted()
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for position, mean in enumerate(self.train_mean_):
            tensors[f"train_mean.{position}"] = mean
        for position, mean in enumerate(self.absent_):
            tensors[f"absent.{position}"] = mean
        for position, stats in enumerate(self.standardisation_ or ()):
            tensors[f"standardise.{position}.mean"] = stats["mean"]
            tensors[f"standardise.{position}.sd"] = stats["sd"]
        sites = list(self.site_shifts_)
        for index, site in enumerate(sites):
            for position, shift in enumerate(self.site_shifts_[site]):
                tensors[f"centre.{index}.{position}"] = shift
        if self.kind == "head":
            for name, value in self.network_.state_dict().items():
                tensors[f"network.{name}"] = value
        else:
            tensors["probe.coef"] = torch.from_numpy(self.probe_.coef)
            tensors["probe.intercept"] = torch.from_numpy(self.probe_.intercept)
        config = {
            "format": HEAD_FORMAT,
            "version": HEAD_FORMAT_VERSION,
            "kind": self.kind,
            "model": dataclasses.asdict(self.model),
            "settings": {
                field.name: _plain(getattr(self.settings, field.name))
                for field in dataclasses.fields(HeadSettings)
            },
            "classes": list(self.classes),
            "standardise": self.standardise,
            "centre_external": self.centre_external,
            "target_sensitivity": self.target_sensitivity,
            "target_specificity": self.target_specificity,
            "origin": self.origin,
            "sources": [dataclasses.asdict(source) for source in self.sources_],
            "clinical": self.clinical_.to_dict() if self.clinical_ is not None else None,
            "training_sites": list(self.training_sites_),
            "external_sites": sites,
            "thresholds": self.thresholds_,
            "inputs_used": list(self.inputs_used_),
            "training": self.training_,
        }
        if self.kind == "probe":
            config["probe"] = {"c": self.probe_.c, "val_loss": self.probe_.val_loss}
        tensor_path, config_path = _named(stem, TENSOR_SUFFIX), _named(stem, CONFIG_SUFFIX)
        partial = tensor_path.with_name(tensor_path.name + ".partial")
        save_file(
            {name: value.contiguous() for name, value in tensors.items()},
            str(partial),
            metadata={"format": HEAD_FORMAT, "version": str(HEAD_FORMAT_VERSION)},
        )
        partial.replace(tensor_path)
        partial = config_path.with_name(config_path.name + ".partial")
        partial.write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
        partial.replace(config_path)
        return config_path

    @classmethod
    def load(cls, path: str | Path) -> FittedHead:
        """Read a head saved by `save`; no code in the files runs.

        Raises:
            UserError: a missing or damaged file, another format or version.
        """
        stem = _stem(path)
        config_path, tensor_path = _named(stem, CONFIG_SUFFIX), _named(stem, TENSOR_SUFFIX)
        for needed in (config_path, tensor_path):
            if not needed.is_file():
                raise UserError(
                    f"{needed} does not exist: a saved head is a pair NAME.json + "
                    "NAME.safetensors (python -m fuse protocol --heads FOLDER writes them)"
                )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            tensors = load_file(str(tensor_path))
        except (UnicodeDecodeError, json.JSONDecodeError, SafetensorError, OSError) as error:
            raise UserError(
                f"{stem}: the head's files are damaged ({type(error).__name__}); save the "
                "head again (rerun `python -m fuse protocol`)"
            ) from None
        if config.get("format") != HEAD_FORMAT or config.get("version") != HEAD_FORMAT_VERSION:
            raise UserError(
                f"{config_path}: format {config.get('format')!r} version "
                f"{config.get('version')!r}; this tool reads {HEAD_FORMAT} version "
                f"{HEAD_FORMAT_VERSION}: save the head again with this version"
            )
        try:
            return cls._from_saved(config, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise UserError(
                f"{stem}: the head's files do not fit together ({type(error).__name__}: "
                f"{error}); save the head again (rerun `python -m fuse protocol`)"
            ) from None

    @classmethod
    def _from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]):
        model = ModelSpec(
            **{
                **config["model"],
                "inputs": tuple(tuple(feature) for feature in config["model"]["inputs"]),
            }
        )
        settings = HeadSettings(
            **{
                name: tuple(value) if isinstance(value, list) else value
                for name, value in config["settings"].items()
            }
        )
        head = cls(
            model,
            config["kind"],
            settings,
            config["classes"],
            config["standardise"],
            config["centre_external"],
            config["target_sensitivity"],
            config["target_specificity"],
            config["origin"],
        )
        head.sources_ = tuple(FeatureSource(**source) for source in config["sources"])
        clinical = config.get("clinical")  # absent from heads saved before clinical inputs
        head.clinical_ = ClinicalEncoding.from_dict(clinical) if clinical else None
        if model.clinical != (head.clinical_ is not None):
            raise ValueError("the model's clinical input and the saved encoding disagree")
        head.clinical = head.clinical_.columns if head.clinical_ is not None else None
        positions = range(len(head.sources_))
        head.train_mean_ = [tensors[f"train_mean.{position}"] for position in positions]
        head.standardisation_ = (
            [
                {
                    "mean": tensors[f"standardise.{position}.mean"],
                    "sd": tensors[f"standardise.{position}.sd"],
                }
                for position in positions
            ]
            if head.standardise
            else None
        )
        head.training_sites_ = tuple(config["training_sites"])
        head.site_shifts_ = {
            site: [tensors[f"centre.{index}.{position}"] for position in positions]
            for index, site in enumerate(config["external_sites"])
        }
        head.thresholds_ = dict(config["thresholds"])
        absent = sum(name.startswith("absent.") for name in tensors)
        # heads saved before input selection (no clinical input either) read every input,
        # and their stand-in for a missing input is the training mean
        head.absent_ = [tensors[f"absent.{position}"] for position in range(absent)] or list(
            head.train_mean_
        )
        head.inputs_used_ = tuple(config.get("inputs_used") or (True,) * len(head.absent_))
        head.training_ = dict(config["training"])
        head.history_ = []
        if head.kind == "head":
            network = head._network()
            prefix = "network."
            network.load_state_dict(
                {
                    name[len(prefix) :]: value
                    for name, value in tensors.items()
                    if name.startswith(prefix)
                }
            )
            head.network_ = network.eval()
        else:
            head.probe_ = ProbeFit(
                coef=tensors["probe.coef"].numpy(),
                intercept=tensors["probe.intercept"].numpy(),
                c=config["probe"]["c"],
                val_loss=config["probe"]["val_loss"],
            )
        return head


def _shifted(
    inputs: Sequence[torch.Tensor],
    rows_of_site: Mapping[str, torch.Tensor],
    shifts: Mapping[str, Sequence[torch.Tensor]],
) -> list[torch.Tensor]:
    """Each input with `shifts[site][input]` added to the rows of each site."""
    if not rows_of_site:
        return list(inputs)
    shifted = []
    for position, vectors in enumerate(inputs):
        vectors = vectors.clone()
        for site, rows in rows_of_site.items():
            vectors[rows] += shifts[site][position]
        shifted.append(vectors)
    return shifted


def _used_names(names: Sequence[str], used: Sequence[bool]) -> str:
    return "+".join(name for name, kept in zip(names, used, strict=True) if kept)


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (TENSOR_SUFFIX, CONFIG_SUFFIX) else path


def _named(stem: Path, suffix: str) -> Path:
    # Appended, not with_suffix: a stem may hold a dot of its own (trial0-fold0-fraction0.5-
    # head), which with_suffix would take for a suffix and replace.
    return stem.with_name(stem.name + suffix)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
