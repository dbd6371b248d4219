"""The models the protocol compares, each a head on named cached features.

Every model here is a frozen-feature head: the encoders never train. The paper's baselines
(CLIP, ALIGN, BLIP-2, ViLT) were fine-tuned models; here they are their encoders' cached
vectors under a plain MLP head, which every output says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fuse.data import FeatureId
from pipeline.errors import UserError

HEADS = {
    "vlmf": "VLMF-Net head: projectors (image -> 512, report -> 2048, clinical variables -> "
    "32), L2-normalisation, concatenation, MLP; cross-entropy + 0.1 x NT-Xent between image "
    "and report when both are used",
    "mlp": "frozen-feature baseline head: the encoder's vectors concatenated into the same MLP, "
    "cross-entropy only",
    "exam": "exam-level VLMF-Net head: one sample per exam; the vision projector and "
    "L2-normalisation per image, gated attention pooling over the exam's images (Ilse et al. "
    "2018), fused with the report's projection, the same MLP; cross-entropy + 0.1 x NT-Xent "
    "between pooled image and report, about batch_size pairs per step; its probe is the "
    "logistic regression on each exam's mean vectors",
}
EXAM_HEAD = "exam"  # the head that scores whole exams: its table rows repeat the exam's score
PROJECTED_HEADS = ("vlmf", EXAM_HEAD)  # heads with VLMF-Net's projectors and NT-Xent
FROZEN_NOTE = (
    "Baselines are frozen-feature heads (cached encoder vectors + MLP), not fine-tuned models."
)


@dataclass(frozen=True)
class ModelSpec:
    """One row of the paper's tables: which head runs on which cached features."""

    name: str
    head: str  # a key of HEADS
    inputs: tuple[FeatureId, ...]  # (encoder, modality), in the order the head takes them
    role: str  # "proposed", "ablation", "baseline" or "extension"
    description: str
    clinical: bool = False  # also takes the declared clinical columns (pipeline.clinical)


def protocol_models(
    image_encoder: str, text_encoder: str, vit_encoder: str
) -> dict[str, ModelSpec]:
    """Every model the protocol knows, keyed by name.

    Args:
        image_encoder: the image features of M1 and M4 (the paper: blip2-qformer).
        text_encoder: the report features of M2, M3 and M4 (the paper: llama3).
        vit_encoder: the image features of M3, the ViT without the Q-Former.
    """
    image, text, vit = (image_encoder, "image"), (text_encoder, "text"), (vit_encoder, "image")
    specs = [
        ModelSpec("M4", "vlmf", (image, text), "proposed", "VLMF-Net: image + report"),
        ModelSpec("M1", "vlmf", (image,), "ablation", "image only"),
        ModelSpec("M2", "vlmf", (text,), "ablation", "report only"),
        ModelSpec("M3", "vlmf", (vit, text), "ablation", "image without Q-Former + report"),
        ModelSpec(
            "M4-clinical",
            "vlmf",
            (image, text),
            "extension",
            "VLMF-Net + the declared clinical variables through their own projector",
            clinical=True,
        ),
        ModelSpec(
            "M4-exam",
            EXAM_HEAD,
            (image, text),
            "extension",
            "M4's inputs, one sample per exam: attention over its images + its report "
            "(compare it at exam level; probe on exam-mean vectors)",
        ),
        ModelSpec(
            "CLIP",
            "mlp",
            (("clip-image", "image"), ("clip-text", "text")),
            "baseline",
            "CLIP ViT-L/14 towers",
        ),
        ModelSpec(
            "ALIGN",
            "mlp",
            (("align-image", "image"), ("align-text", "text")),
            "baseline",
            "ALIGN towers",
        ),
        ModelSpec(
            "BLIP-2",
            "mlp",
            (("blip2-qformer", "image"), ("blip2-text", "text")),
            "baseline",
            "BLIP-2 Q-Former image features and Q-Former text feature",
        ),
        ModelSpec("ViLT", "mlp", (("vilt", "pair"),), "baseline", "ViLT pair vector"),
        ModelSpec(
            "Chinese-CLIP",
            "mlp",
            (("chinese-clip-image", "image"), ("chinese-clip-text", "text")),
            "baseline",
            "Chinese-CLIP towers (a fair baseline for Chinese reports)",
        ),
    ]
    return {spec.name: spec for spec in specs}


def select_models(known: Mapping[str, ModelSpec], names: tuple[str, ...]) -> list[ModelSpec]:
    """The requested models, in the order given.

    Raises:
        UserError: an unknown or repeated name, listing the known ones.
    """
    unknown = [name for name in names if name not in known]
    if unknown or len(set(names)) != len(names) or not names:
        raise UserError(
            f"models {list(names)}: give each once, from {', '.join(known)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [known[name] for name in names]
