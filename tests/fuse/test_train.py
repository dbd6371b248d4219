"""Training: selection restores the kept epoch, the schedule, the contrastive term's wiring."""

import math

import pytest
import torch
from torch.nn import functional as F

from fuse import train
from fuse.losses import nt_xent
from fuse.model import FusionHead
from fuse.train import HeadSettings, predict_logits, train_head, training_loss, warmup_cosine


def head(widths=(6, 10), projections=True, contrastive=8):
    names = {"image0": widths[0], "text1": widths[1]}
    return FusionHead(
        input_widths=names,
        projections={"image0": 4, "text1": 5} if projections else {},
        hidden_widths=(7,),
        dropout=0.0,
        num_classes=2,
        contrastive_width=contrastive,
    )


def noisy_data(rows=80, seed=0):
    """Weak signal and random labels in part: a big learning rate overfits, so the best
    validation epoch comes early and differs from the last one."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    image = torch.randn(rows, 6, generator=generator) + 0.6 * labels[:, None]
    text = torch.randn(rows, 10, generator=generator) + 0.3 * labels[:, None]
    groups = torch.arange(rows) // 2
    return [image, text], labels, groups


def test_selection_restores_the_weights_of_the_kept_epoch():
    inputs, labels, groups = noisy_data()
    train, val = torch.arange(0, 50), torch.arange(50, 80)
    settings = HeadSettings(
        epochs=40, warmup_epochs=2, learning_rate=0.05, batch_size=16, precision="fp32"
    )
    torch.manual_seed(0)
    trained = train_head(head(), inputs, labels, groups, train, val, settings, seed=0)
    assert not trained.fallback
    assert 2 < trained.best_epoch < 40  # overfitting: the kept epoch is not the last
    kept = trained.history[trained.best_epoch - 1]
    assert kept["val_loss"] == min(h["val_loss"] for h in trained.history[2:])
    logits = predict_logits(trained.model, [x[val] for x in inputs], "fp32")
    assert F.cross_entropy(logits, labels[val]).item() == pytest.approx(kept["val_loss"], abs=1e-6)


def test_patience_stops_after_epochs_without_improvement_and_keeps_the_same_epoch():
    inputs, labels, groups = noisy_data()
    train, val = torch.arange(0, 50), torch.arange(50, 80)
    runs = {}
    for patience in (0, 5):
        settings = HeadSettings(
            epochs=40,
            warmup_epochs=2,
            learning_rate=0.05,
            batch_size=16,
            precision="fp32",
            patience=patience,
        )
        torch.manual_seed(0)
        runs[patience] = train_head(head(), inputs, labels, groups, train, val, settings, 0)
    every_epoch, patient = runs[0], runs[5]
    assert every_epoch.epochs_trained == 40
    # The same run up to the stop, which comes 5 epochs after the best epoch so far ...
    assert patient.history == every_epoch.history[: patient.epochs_trained]
    assert patient.epochs_trained == patient.best_epoch + 5 < 40
    eligible_losses = [record["val_loss"] for record in patient.history[2:]]
    assert patient.history[patient.best_epoch - 1]["val_loss"] == min(eligible_losses)
    # ... whose weights are the ones restored.
    logits = predict_logits(patient.model, [x[val] for x in inputs], "fp32")
    assert F.cross_entropy(logits, labels[val]).item() == pytest.approx(min(eligible_losses))


def test_warm_up_epochs_and_one_class_heads_are_never_kept():
    inputs, labels, groups = noisy_data()
    train, val = torch.arange(0, 50), torch.arange(50, 80)
    # A learning rate so small that the head barely moves: it puts every row in one class.
    settings = HeadSettings(epochs=6, warmup_epochs=2, learning_rate=1e-9, precision="fp32")
    torch.manual_seed(0)
    model = head()
    with torch.no_grad():
        model.classifier[-1].bias.copy_(torch.tensor([5.0, -5.0]))
    trained = train_head(model, inputs, labels, groups, train, val, settings, seed=0)
    assert trained.fallback and trained.best_epoch == 6
    settings = HeadSettings(epochs=6, warmup_epochs=4, learning_rate=0.05, precision="fp32")
    trained = train_head(head(), inputs, labels, groups, train, val, settings, seed=0)
    assert trained.best_epoch > 4


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)
    inputs, labels, groups = noisy_data()
    settings = HeadSettings(
        epochs=6, warmup_epochs=2, learning_rate=0.01, batch_size=25, precision="fp32"
    )
    trained = train_head(
        head(), inputs, labels, groups, torch.arange(50), torch.arange(50, 80), settings, 0
    )
    steps_per_epoch, total = 2, 12
    for record in trained.history:  # the rate after each epoch's last step
        step = record["epoch"] * steps_per_epoch
        assert record["learning_rate"] == pytest.approx(0.01 * warmup_cosine(step, 4, total))


def test_loss_is_cross_entropy_plus_weighted_nt_xent_between_the_two_inputs():
    inputs, labels, groups = noisy_data(rows=12)
    model = head()
    model.eval()
    settings = HeadSettings(contrastive_weight=0.3, temperature=0.2)
    loss = training_loss(model, inputs, labels, groups, settings)
    logits, (image_embedding, text_embedding) = model(inputs)
    expected = F.cross_entropy(logits, labels) + 0.3 * nt_xent(
        image_embedding, text_embedding, groups, 0.2
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)
    loss.backward()
    for layer in model.contrastive.values():
        assert layer.weight.grad.abs().sum() > 0  # the NT-Xent term reaches its heads


def test_single_modality_and_baseline_heads_have_no_contrastive_term():
    assert not head(contrastive=0).contrastive
    baseline = head(projections=False, contrastive=8)
    assert not baseline.projectors and not baseline.contrastive
    logits, embeddings = baseline([torch.randn(3, 6), torch.randn(3, 10)])
    assert logits.shape == (3, 2) and embeddings is None


def test_bf16_training_stays_close_to_fp32():
    inputs, labels, groups = noisy_data(rows=200, seed=1)
    train, val = torch.arange(0, 150), torch.arange(150, 200)
    results = {}
    for precision in ("fp32", "bf16"):
        settings = HeadSettings(epochs=10, warmup_epochs=1, learning_rate=0.01, precision=precision)
        torch.manual_seed(0)
        trained = train_head(head(), inputs, labels, groups, train, val, settings, seed=0)
        results[precision] = trained.history[-1]["val_loss"]
    assert math.isclose(results["fp32"], results["bf16"], rel_tol=0.05)


def test_bf16_steps_see_the_weights_of_the_step_before():
    """Within one epoch, each bf16 forward must use the weights the last step wrote (an
    autocast region spanning the epoch would keep its first bfloat16 copies)."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 2, (640,), generator=generator)
    inputs = [
        torch.randn(640, width, generator=generator) + 2.0 * labels[:, None] for width in (6, 10)
    ]
    groups = torch.arange(640)
    train, val = torch.arange(0, 600), torch.arange(600, 640)
    first_epoch_loss = {}
    for precision in ("fp32", "bf16"):
        settings = HeadSettings(
            epochs=2, warmup_epochs=0, learning_rate=0.05, batch_size=20, precision=precision
        )
        torch.manual_seed(0)
        trained = train_head(head(), inputs, labels, groups, train, val, settings, seed=0)
        first_epoch_loss[precision] = trained.history[0]["train_loss"]
    assert math.isclose(first_epoch_loss["fp32"], first_epoch_loss["bf16"], rel_tol=0.05)


@pytest.mark.parametrize(("fast", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, fast, expected):
    monkeypatch.setattr(train, "cpu_bf16_is_fast", lambda: fast)
    assert HeadSettings().precision == "auto"
    assert train.resolve_precision(HeadSettings()).precision == expected
    assert train.resolve_precision(HeadSettings(precision="fp32")).precision == "fp32"
    with train.autocast("auto"):
        product = torch.ones(2, 3) @ torch.ones(3, 2)
    assert product.dtype == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("projections", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_variant_at_once_equals_one_forward_per_variant(projections, precision):
    """Selection scores each input set from one pass (fuse.train.variant_logits); each must
    be what the head gives with the unused inputs replaced by their stand-in."""
    model = head(projections=projections)
    inputs, _, _ = noisy_data(rows=70)
    absent = [x[:40].mean(dim=0) for x in inputs]
    variants = [(True, True), (True, False), (False, True)]
    at_once = train.variant_logits(model, inputs, absent, variants, precision)
    tolerance = {"fp32": 1e-5, "bf16": 5e-2}[precision]
    for used, logits in zip(variants, at_once, strict=True):
        one = predict_logits(model, train.with_absent(inputs, absent, used), precision)
        torch.testing.assert_close(logits, one, atol=tolerance, rtol=0)
    assert not torch.allclose(at_once[1], at_once[2])  # the variants do differ
