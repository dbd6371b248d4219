"""The exam-level head: one sample per examination (one report, several images).

Each image vector goes through the vision projector and L2-normalisation, as in M4; gated
attention (Ilse, Tomczak and Welling, "Attention-based deep multiple instance learning",
ICML 2018, eq. 9) weighs the exam's images, masked over padding; the weighted mean is
fused with the report's projection and classified by the same MLP. An exam's images are
one bag: the network learns which of them carry the diagnosis instead of averaging
every image's score afterwards.

Exams are padded to a rectangle once (real images first, then padding with a mask), so a
batch is an index into exam-aligned tensors as a batch of pairs is into row-aligned ones,
and the training loop of fuse.train runs unchanged; each step trims the padding to its
batch's longest exam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from fuse.model import Dense, FusionHead
from fuse.schema import LEVELS
from fuse.train import autocast

_PREDICT_CHUNK_EXAMS = 512


def exam_ids(table: pd.DataFrame) -> np.ndarray:
    """Each row's exam as an integer: patient and exam id together (exam ids may be
    numbered per patient, 1, 2, ...)."""
    return table.groupby(list(LEVELS["exam"]), sort=False).ngroup().to_numpy()


@dataclass(frozen=True)
class ExamLayout:
    """Which rows form which exam, as tensors: exams in order of first appearance."""

    exam_of_row: torch.Tensor  # [rows] the row's exam
    position_of_row: torch.Tensor  # [rows] the row's slot in its exam
    members: torch.Tensor  # [exams, longest] row of each slot; padding repeats slot 0's row
    mask: torch.Tensor  # [exams, longest] True on real images

    @classmethod
    def of(cls, exams: Sequence | np.ndarray) -> ExamLayout:
        """The layout of rows whose exams are `exams` (any hashable id per row)."""
        codes, _ = pd.factorize(np.asarray(exams))
        exam_of_row = torch.from_numpy(codes.astype(np.int64))
        rows = len(exam_of_row)
        sizes = torch.bincount(exam_of_row)
        starts = torch.cumsum(sizes, dim=0) - sizes
        order = torch.argsort(exam_of_row, stable=True)  # rows grouped by exam, in row order
        position_of_row = torch.empty(rows, dtype=torch.long)
        position_of_row[order] = torch.arange(rows) - starts[exam_of_row[order]]
        # Padding points at a real row so gathering never indexes out of range; the mask
        # keeps it out of everything.
        members = order[starts][:, None].repeat(1, int(sizes.max()))
        members[exam_of_row, position_of_row] = torch.arange(rows)
        mask = torch.zeros(members.shape, dtype=torch.bool)
        mask[exam_of_row, position_of_row] = True
        return cls(exam_of_row, position_of_row, members, mask)

    @property
    def sizes(self) -> torch.Tensor:
        """[exams] images per exam."""
        return self.mask.sum(dim=1)

    @property
    def first_rows(self) -> torch.Tensor:
        """[exams] each exam's first row, which carries the exam's label and report."""
        return self.members[:, 0]

    def exams_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The exams whose rows `rows` are.

        Raises:
            ValueError: `rows` holds only some rows of an exam (splits are drawn per patient,
                so an exam is never split; a partial exam would be scored on rows not given).
        """
        exams, counts = torch.unique(self.exam_of_row[rows], return_counts=True)
        partial = exams[counts != self.sizes[exams]]
        if len(partial):
            raise ValueError(
                f"{len(partial)} exam(s) have only some of their rows among the rows given: "
                "an exam-level head takes whole exams"
            )
        return exams

    def per_row(self, per_exam: torch.Tensor) -> torch.Tensor:
        """[exams, longest] values -> [rows], each row's own slot."""
        return per_exam[self.exam_of_row, self.position_of_row]


def exam_means(vectors: torch.Tensor, layout: ExamLayout) -> torch.Tensor:
    """[rows, width] -> [exams, width], the mean of each exam's rows."""
    sums = torch.zeros(len(layout.mask), vectors.shape[1], dtype=vectors.dtype)
    sums.index_add_(0, layout.exam_of_row, vectors)
    return sums / layout.sizes[:, None].to(vectors.dtype)


def exam_inputs(
    inputs: Sequence[torch.Tensor], layout: ExamLayout, pooled: Sequence[bool]
) -> list[torch.Tensor]:
    """Row-aligned inputs -> the exam network's inputs, exam-aligned.

    Args:
        inputs: [rows, width] per input.
        layout: the rows' exams.
        pooled: per input, whether it is per image (padded to [exams, longest, width],
            zero on padding) or per report (the exam's mean row: its one report's vector).

    Returns:
        The inputs in order, then the mask [exams, longest] as 0/1 floats (a float, so the
        training loop's cast of every input to its compute dtype keeps it exact).
    """
    mask = layout.mask
    arranged = [
        vectors[layout.members] * mask[..., None] if per_image else exam_means(vectors, layout)
        for vectors, per_image in zip(inputs, pooled, strict=True)
    ]
    return [*arranged, mask.float()]


def exam_batch_size(pairs_per_step: int, layout: ExamLayout, exams: torch.Tensor) -> int:
    """Exams per step holding about `pairs_per_step` image-report pairs, so the exam head
    takes as many steps per epoch, on as many images per step, as the pair heads."""
    mean_size = float(layout.sizes[exams].float().mean())
    return max(1, round(pairs_per_step / mean_size))


class GatedAttention(torch.nn.Module):
    """a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))) over one exam's images.

    Args:
        width: the image embeddings' width.
        hidden: the width of V and U (Ilse et al. use 128).
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.hidden = Dense(width, 2 * hidden)  # V and U in one product
        self.score = Dense(hidden, 1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images [exams, slots, width], mask [exams, slots] -> weights [exams, slots]
        that sum to 1 over each exam's real images and are 0 on padding."""
        exams, slots, width = images.shape
        value, gate = self.hidden(images.reshape(exams * slots, width)).chunk(2, dim=-1)
        scores = self.score(torch.tanh(value) * torch.sigmoid(gate)).reshape(exams, slots)
        return torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)


class ExamFusionHead(FusionHead):
    """VLMF-Net's head over a whole exam: attention-pooled images + the report.

    The projectors, the MLP, the contrastive maps and `forward` are FusionHead's; between
    projection and concatenation the image input's projections are pooled by gated
    attention (`fused_parts`), so NT-Xent pairs the pooled image with the report. The
    pooled vector is L2-normalised again (a weighted mean of unit vectors is shorter than
    one), so it enters the classifier at the report projection's scale, as M4's does.

    Args:
        pooled: the input whose vectors are per image; the others are per exam.
        attention_width: hidden width of the gated attention.
        **fusion: FusionHead's arguments; every input must have a projector.
    """

    def __init__(self, *, pooled: str, attention_width: int, **fusion) -> None:
        super().__init__(**fusion)
        if pooled not in self.input_names or not self.projectors:
            raise ValueError(f"pooled input {pooled!r} must be one of the projected inputs")
        self.pooled = pooled
        self.attention = GatedAttention(self.projectors[pooled].out_features, attention_width)

    def pooled_parts(
        self, inputs: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What the classifier reads, one part per input (the attention-pooled image
        projection, the report's projection), and the attention weights [exams, slots].

        Args:
            inputs: exam_inputs' output: one tensor per input, then the mask.
        """
        *vectors, mask = inputs
        mask = mask > 0
        slots = mask.shape[1]
        longest = int(mask.sum(dim=1).max())  # real images come first: the rest is padding
        mask = mask[:, :longest]
        parts, attention = [], None
        for name, values in zip(self.input_names, vectors, strict=True):
            if name != self.pooled:
                parts.append(F.normalize(self.projectors[name](values), dim=-1))
                continue
            images = values[:, :longest]
            exams, _, width = images.shape
            embedded = F.normalize(
                self.projectors[name](images.reshape(exams * longest, width)), dim=-1
            ).reshape(exams, longest, -1)
            attention = self.attention(embedded, mask)
            pooled = (attention.to(embedded.dtype).unsqueeze(1) @ embedded).squeeze(1)
            parts.append(F.normalize(pooled, dim=-1))
        return parts, F.pad(attention, (0, slots - longest))

    def fused_parts(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """FusionHead's contract (its `forward` and the attributions read it)."""
        return self.pooled_parts(inputs)[0]

    def attend(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [exams, classes] and attention weights [exams, slots]."""
        parts, attention = self.pooled_parts(inputs)
        return self.classifier(torch.cat(parts, dim=-1)), attention


@torch.no_grad()
def predict_exams(
    model: ExamFusionHead, inputs: Sequence[torch.Tensor], precision: str
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [exams, classes] and attention weights [exams, slots] of
    exam_inputs' output, with dropout off."""
    model.eval()
    probabilities, attention = [], []
    with autocast(precision):
        for start in range(0, len(inputs[0]), _PREDICT_CHUNK_EXAMS):
            logits, weights = model.attend(
                [x[start : start + _PREDICT_CHUNK_EXAMS] for x in inputs]
            )
            probabilities.append(torch.softmax(logits.float(), dim=-1))
            attention.append(weights.float())
    return torch.cat(probabilities).numpy(), torch.cat(attention).numpy()
