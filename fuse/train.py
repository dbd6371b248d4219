"""Training one head on in-memory cached vectors, with model selection on validation.

Everything a step touches is already a tensor in memory: a batch is an index into
row-aligned matrices, so there is no per-sample Python, no DataLoader and no copy of the
data set per epoch. AdamW runs fused; on a CPU with bf16 units, matrix products run in
bfloat16 under autocast with float32 master weights, optimizer state and losses
(`precision` chooses; elsewhere everything is float32). A large bf16 head (the paper's
widths) trains on a bfloat16 working copy of its weights instead, updated with the master
weights in one compiled pass (fuse.fused_update), which saves autocast's casts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn import functional as F

from fuse.fused_update import FusedBF16AdamW, fused_update_pays
from fuse.losses import nt_xent
from fuse.model import FusionHead
from pipeline.config import check_declared, setting
from pipeline.errors import UserError
from pipeline.hardware import cpu_bf16_is_fast
from pipeline.memory import reuse_freed_memory
from pipeline.metrics import roc_auc

SELECTION_CRITERIA = ("val_loss", "val_auc")
PRECISIONS = ("auto", "bf16", "fp32")
_PREDICT_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class HeadSettings:
    """The head's architecture and its optimisation (METHOD.md gives the paper's values)."""

    image_projection: int = setting(512, "width of the vision projector f_vp's output")
    text_projection: int = setting(2048, "width of the text projector f_tp's output")
    clinical_projection: int = setting(
        32, "width of the clinical variables' projector (models that take them)", at_least=1
    )
    hidden_widths: tuple[int, ...] = setting(
        (512, 128), "widths of the classifier's hidden fully connected layers"
    )
    dropout: float = setting(0.3, "dropout probability after each hidden layer", at_least=0)
    contrastive_width: int = setting(
        256, "shared width the two projections are mapped to for the NT-Xent loss"
    )
    contrastive_weight: float = setting(0.1, "c in loss = cross-entropy + c x NT-Xent")
    attention_width: int = setting(
        128, "hidden width of the exam head's gated attention (Ilse et al. 2018 use 128)"
    )
    temperature: float = setting(0.1, "NT-Xent softmax temperature tau")
    learning_rate: float = setting(
        1e-4,
        "AdamW peak learning rate (the paper's 1e-5 suits its 5,800 pairs; see README); "
        "the protocol's learning_rates searches several",
    )
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_epochs: int = setting(
        1,
        "epochs of linear warm-up before the cosine decay; fewer than epochs, as no warm-up "
        "epoch can be kept; selection skips them, so a longer warm-up on a head that "
        "overfits within a few epochs keeps its first eligible epoch (see README)",
        at_least=0,
    )
    epochs: int = setting(80, "training epochs (at most, with patience)", at_least=1)
    patience: int = setting(
        20,
        "stop once this many epochs have passed without a better eligible epoch (the "
        "kept head is then the best so far); 0: train every epoch, as the paper",
        at_least=0,
    )
    batch_size: int = setting(64, "image-report pairs per optimisation step", at_least=1)
    modality_dropout: float = setting(
        0.3,
        "probability that a training pair's input (image or report) is replaced by the "
        "training rows' mean, never every input of one pair; selection then also scores "
        "each input alone on validation and keeps the best epoch and input set: a "
        "modality that only adds noise is left out instead of dragging the fusion down, "
        "and one head serves pairs whose report is missing (README, Modality analyses); "
        "0: off, every input always used (the paper)",
        at_least=0,
    )
    selection: str = setting(
        "val_loss",
        "which epoch's weights are kept: val_loss (lowest validation cross-entropy) or "
        "val_auc; only epochs after warm-up whose validation predictions contain every "
        "class are eligible",
        choices=SELECTION_CRITERIA,
    )
    precision: str = setting(
        "auto",
        "bf16: matrix products in bfloat16 under autocast (float32 weights, optimizer and "
        "losses); fp32: everything in float32; auto: bf16 on a CPU with bf16 units "
        "(AVX512-BF16 or AMX), else fp32, as emulated bf16 is far slower there; a "
        "saved head records which one it trained with",
        choices=PRECISIONS,
    )


@dataclass
class TrainedHead:
    """A head after training, its kept epoch and how training went."""

    model: FusionHead
    best_epoch: int  # 1-based epoch whose weights were restored into `model`
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    fallback: bool = False  # no epoch was eligible: the last epoch was kept
    first_eligible_epoch: int | None = None  # the earliest epoch selection could keep
    inputs_used: tuple[bool, ...] = ()  # which inputs the kept head reads (the rest: absent)

    @property
    def epochs_trained(self) -> int:
        """Epochs actually run: fewer than `epochs` when patience stopped training."""
        return len(self.history)


def resolve_precision(settings: HeadSettings) -> HeadSettings:
    """`settings` with precision "auto" replaced by what this CPU runs fastest."""
    if settings.precision != "auto":
        return settings
    return replace(settings, precision="bf16" if cpu_bf16_is_fast() else "fp32")


def check_settings(settings: HeadSettings) -> None:
    """Check the settings against their declared limits and how they relate.

    Raises:
        UserError: a value out of its limits (pipeline.config.check_declared), or as many
            warm-up epochs as epochs or more: no epoch could be kept, and the head would
            be its last, never-selected epoch.
    """
    check_declared(settings)
    if settings.modality_dropout >= 1:
        raise UserError(
            f"--modality-dropout is {settings.modality_dropout}: give a probability below 1"
        )
    if settings.warmup_epochs >= settings.epochs:
        raise UserError(
            f"--warmup-epochs is {settings.warmup_epochs} and --epochs {settings.epochs}: "
            "only epochs after warm-up can be kept, so give more epochs than warm-up epochs"
        )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """A context where matrix products run in bfloat16 ("bf16"), or a no-op ("fp32");
    "auto" as resolve_precision chooses."""
    if precision == "bf16" or (precision == "auto" and cpu_bf16_is_fast()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(
    model: FusionHead, inputs: Sequence[torch.Tensor], precision: str
) -> torch.Tensor:
    """Float32 logits of every row of `inputs`, with dropout off."""
    model.eval()
    chunks = []
    with autocast(precision):
        for start in range(0, len(inputs[0]), _PREDICT_CHUNK_ROWS):
            logits, _ = model([x[start : start + _PREDICT_CHUNK_ROWS] for x in inputs])
            chunks.append(logits.float())
    return torch.cat(chunks)


@torch.no_grad()
def variant_logits(
    model: FusionHead,
    inputs: Sequence[torch.Tensor],
    absent: Sequence[torch.Tensor],
    variants: Sequence[tuple[bool, ...]],
    precision: str,
) -> list[torch.Tensor]:
    """Float32 logits of every row for each input variant (inputs not used in it replaced by
    `absent`), with dropout off: what predict_logits gives on with_absent(inputs, absent,
    used), at the cost of about one forward instead of one per variant."""
    if len(variants) == 1:
        return [predict_logits(model, with_absent(inputs, absent, variants[0]), precision)]
    model.eval()
    chunks: list[list[torch.Tensor]] = [[] for _ in variants]
    with autocast(precision):
        for start in range(0, len(inputs[0]), _PREDICT_CHUNK_ROWS):
            rows = [x[start : start + _PREDICT_CHUNK_ROWS] for x in inputs]
            for chunk, logits in zip(
                chunks, model.variant_logits(rows, absent, variants), strict=True
            ):
                chunk.append(logits.float())
    return [torch.cat(chunk) for chunk in chunks]


def predict_proba(model: FusionHead, inputs: Sequence[torch.Tensor], precision: str) -> np.ndarray:
    """Class probabilities [rows, classes] of every row of `inputs`."""
    return torch.softmax(predict_logits(model, inputs, precision), dim=-1).numpy()


def training_loss(
    forward: Callable[[Sequence[torch.Tensor]], tuple],
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    report_groups: torch.Tensor,
    settings: HeadSettings,
) -> torch.Tensor:
    """Cross-entropy + contrastive_weight x NT-Xent (when the head has contrastive outputs);
    `forward` is the head, or the head on other weights (FusedBF16AdamW.forward)."""
    logits, embeddings = forward(inputs)
    loss = F.cross_entropy(logits.float(), labels)
    if embeddings is not None and settings.contrastive_weight:
        image_embedding, text_embedding = (embedding.float() for embedding in embeddings)
        loss = loss + settings.contrastive_weight * nt_xent(
            image_embedding, text_embedding, report_groups, settings.temperature
        )
    return loss


def modality_dropped(
    batch: Sequence[torch.Tensor],
    absent: Sequence[torch.Tensor],
    probability: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """`batch` with each row's inputs replaced by `absent` with `probability`, never all
    of one row's inputs (one of them is then kept at random)."""
    if probability <= 0 or len(batch) < 2:
        return list(batch)
    rows = len(batch[0])
    dropped = torch.rand(rows, len(batch), generator=generator) < probability
    every = dropped.all(dim=1)
    kept = torch.randint(len(batch), (rows,), generator=generator)
    dropped[every, kept[every]] = False
    return [
        torch.where(dropped[:, position, None], mean.to(vectors.dtype), vectors)
        for position, (vectors, mean) in enumerate(zip(batch, absent, strict=True))
    ]


def input_variants(inputs: int, settings: HeadSettings) -> list[tuple[bool, ...]]:
    """The input sets selection may choose from: every input, and, for a head trained with
    modality dropout (which has seen each input alone), each input alone."""
    every = (True,) * inputs
    if settings.modality_dropout <= 0 or inputs < 2:
        return [every]
    return [every, *(tuple(other == kept for other in range(inputs)) for kept in range(inputs))]


def with_absent(
    inputs: Sequence[torch.Tensor], absent: Sequence[torch.Tensor], used: Sequence[bool]
) -> list[torch.Tensor]:
    """`inputs` with every input not `used` replaced by its `absent` vector."""
    return [
        vectors if keep else mean.to(vectors.dtype).expand_as(vectors)
        for vectors, mean, keep in zip(inputs, absent, used, strict=True)
    ]


def _best_variant(
    model: FusionHead,
    val_inputs: Sequence[torch.Tensor],
    val_labels: torch.Tensor,
    absent: Sequence[torch.Tensor],
    variants: Sequence[tuple[bool, ...]],
    settings: HeadSettings,
    num_classes: int,
    epoch: int,
) -> tuple[dict, torch.Tensor]:
    """This epoch's validation record of the best input variant (eligible ones first)."""
    best: tuple[bool, dict, torch.Tensor] | None = None
    for used, logits in zip(
        variants,
        variant_logits(model, val_inputs, absent, variants, settings.precision),
        strict=True,
    ):
        record = {
            "val_loss": float(F.cross_entropy(logits, val_labels)),
            "val_auc": roc_auc(val_labels.numpy(), torch.softmax(logits, -1)[:, -1].numpy()),
            "inputs_used": used,
        }
        eligible = _eligible(epoch, settings, len(torch.unique(logits.argmax(dim=-1))), num_classes)
        if (
            best is None
            or (eligible, best[0]) == (True, False)
            or (eligible == best[0] and _improves(record, best[1], settings.selection))
        ):
            best = (eligible, record, logits)
    return best[1], best[2]


def _eligible(epoch: int, settings: HeadSettings, predicted_classes: int, classes: int) -> bool:
    # A head still in warm-up, or one that puts every validation row in one class, has not
    # learned to separate anything: keeping it shows accuracy 0.5 beside a flattering AUC.
    return epoch > settings.warmup_epochs and predicted_classes == classes


def _improves(
    record: Mapping[str, float], best: Mapping[str, float] | None, criterion: str
) -> bool:
    if best is None:
        return True
    if criterion == "val_loss":
        return record["val_loss"] < best["val_loss"]
    return record["val_auc"] > best["val_auc"]


def train_head(
    model: FusionHead,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    report_groups: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    settings: HeadSettings,
    seed: int,
) -> TrainedHead:
    """Train `model` on `train_rows` and restore the weights of its best validation epoch.

    Training stops early once `settings.patience` epochs bring no better eligible epoch.
    On the demo's heads the kept epoch was the same as with every epoch trained (README,
    "Defaults, and why").

    Args:
        model: a freshly initialised head.
        inputs: row-aligned input matrices, in the order the head takes them.
        labels: [rows] class indices.
        report_groups: [rows]; equal values share a report (not NT-Xent negatives).
        train_rows, val_rows: row indices.
        settings: optimisation and selection settings.
        seed: seed of batch order and dropout.

    Returns:
        The head with its kept epoch's weights, and the per-epoch history.
    """
    check_settings(settings)
    settings = resolve_precision(settings)
    reuse_freed_memory()
    torch.manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    # Autocast would cast each batch to bfloat16 anyway; casting once halves what every
    # batch gathers from memory.
    input_dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    train_inputs = [x[train_rows].to(input_dtype) for x in inputs]
    val_inputs = [x[val_rows] for x in inputs]
    train_labels, val_labels = labels[train_rows], labels[val_rows]
    train_groups = report_groups[train_rows]
    # The stand-in for a missing input: the training rows' mean, which is also what the
    # occlusion analysis and a missing report at prediction time give the head.
    absent = [x[train_rows].float().mean(dim=0) for x in inputs]
    dropout_generator = torch.Generator().manual_seed(seed + 1)
    variants = input_variants(len(inputs), settings)
    num_classes = model.classifier[-1].out_features
    if fused_update_pays(model, settings.precision):
        optimizer = FusedBF16AdamW(
            model, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        forward = optimizer.forward
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            fused=True,
        )
        forward = model
    steps_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = max(1, steps_per_epoch * settings.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    first_eligible: int | None = None
    best_state = {name: value.clone() for name, value in model.state_dict().items()}
    for epoch in range(1, settings.epochs + 1):
        model.train()
        epoch_loss = torch.zeros(())
        permutation = torch.randperm(len(train_rows), generator=order_generator)
        for batch in permutation.split(settings.batch_size):
            # One autocast region per step: autocast caches the bfloat16 copy of each weight
            # until its region ends, so a region spanning several optimizer steps would run
            # every forward of the epoch on the weights it started with.
            with autocast(settings.precision):
                loss = training_loss(
                    forward,
                    modality_dropped(
                        [x[batch] for x in train_inputs],
                        absent,
                        settings.modality_dropout,
                        dropout_generator,
                    ),
                    train_labels[batch],
                    train_groups[batch],
                    settings,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.detach() * len(batch)
        record, val_logits = _best_variant(
            model, val_inputs, val_labels, absent, variants, settings, num_classes, epoch
        )
        record = {
            "epoch": epoch,
            "train_loss": float(epoch_loss) / len(train_rows),
            **record,
            "learning_rate": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        predicted_classes = len(torch.unique(val_logits.argmax(dim=-1)))
        eligible = _eligible(epoch, settings, predicted_classes, num_classes)
        if eligible and first_eligible is None:
            first_eligible = epoch
        if eligible and _improves(record, best, settings.selection):
            best = record
            best_state = {name: value.clone() for name, value in model.state_dict().items()}
        elif best is not None and settings.patience and epoch - best["epoch"] >= settings.patience:
            break
    if isinstance(optimizer, FusedBF16AdamW):
        optimizer.release()
    if best is None:
        return TrainedHead(
            model=model,
            best_epoch=len(history),
            history=history,
            fallback=True,
            inputs_used=variants[0],
        )
    model.load_state_dict(best_state)
    return TrainedHead(
        model=model,
        best_epoch=int(best["epoch"]),
        history=history,
        first_eligible_epoch=first_eligible,
        inputs_used=tuple(best["inputs_used"]),
    )
