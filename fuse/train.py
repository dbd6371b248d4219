"""Training one VLMF-Net head on cached tensors, with model selection on validation."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from fuse.data import FusionData
from fuse.losses import nt_xent
from fuse.model import VLMFHead
from pipeline.config import setting
from pipeline.metrics import roc_auc


@dataclass(frozen=True)
class HeadSettings:
    """The head's architecture and its optimisation (METHOD.md gives the paper's values)."""

    image_projection: int = setting(512, "width of the vision projector f_vp's output")
    text_projection: int = setting(2048, "width of the text projector f_tp's output")
    hidden_widths: tuple[int, ...] = setting(
        (512, 128), "widths of the classifier's hidden fully connected layers"
    )
    dropout: float = setting(0.3, "dropout probability after each hidden layer")
    contrastive_width: int = setting(
        256, "shared width the two projections are mapped to for the NT-Xent loss"
    )
    contrastive_weight: float = setting(0.1, "c in loss = cross-entropy + c x NT-Xent")
    temperature: float = setting(0.1, "NT-Xent softmax temperature tau")
    learning_rate: float = setting(1e-5, "AdamW peak learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_epochs: int = setting(5, "epochs of linear warm-up before the cosine decay")
    epochs: int = setting(80, "training epochs; the best epoch on validation AUC is kept")
    batch_size: int = setting(64, "image-report pairs per optimisation step")


@dataclass
class TrainedHead:
    """A head after training, and how it got there."""

    model: VLMFHead
    best_epoch: int  # 1-based epoch whose weights were kept
    best_val_auc: float
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch


def build_head(
    variant: str, settings: HeadSettings, data: FusionData, num_classes: int
) -> VLMFHead:
    """A fresh head for `variant` sized to the data's feature widths."""
    return VLMFHead(
        variant=variant,
        image_width=data.image.shape[1],
        text_width=data.text.shape[1],
        image_projection=settings.image_projection,
        text_projection=settings.text_projection,
        hidden_widths=settings.hidden_widths,
        dropout=settings.dropout,
        num_classes=num_classes,
        contrastive_width=settings.contrastive_width,
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def predict_proba(model: VLMFHead, data: FusionData, rows: torch.Tensor) -> np.ndarray:
    """Class probabilities [len(rows), classes] of `rows`, with dropout off."""
    model.eval()
    logits, _ = model(data.image[rows], data.text[rows])
    return torch.softmax(logits, dim=-1).numpy()


def train_head(
    data: FusionData, variant: str, settings: HeadSettings, seed: int, num_classes: int
) -> TrainedHead:
    """Train a head on the train split and keep the epoch with the best validation AUC.

    Loss = cross-entropy + contrastive_weight x NT-Xent (the latter only when both
    modalities are used). AdamW with warm-up then cosine decay, stepped per batch.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_head(variant, settings, data, num_classes)
    train_rows, val_rows = data.rows("train"), data.rows("val")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = max(1, steps_per_epoch * settings.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
    val_labels = data.labels[val_rows].numpy()
    best = TrainedHead(model=model, best_epoch=0, best_val_auc=-math.inf)
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        epoch_loss = 0.0
        for batch in order.split(settings.batch_size):
            logits, embeddings = model(data.image[batch], data.text[batch])
            loss = F.cross_entropy(logits, data.labels[batch])
            if embeddings is not None:
                loss = loss + settings.contrastive_weight * nt_xent(
                    *embeddings, data.report_groups[batch], settings.temperature
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item() * len(batch)
        val_auc = roc_auc(val_labels, predict_proba(model, data, val_rows)[:, -1])
        best.history.append(
            {"epoch": epoch, "train_loss": epoch_loss / len(train_rows), "val_auc": val_auc}
        )
        if val_auc > best.best_val_auc:
            best.best_epoch, best.best_val_auc = epoch, val_auc
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best
