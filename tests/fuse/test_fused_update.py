"""The fused bf16 AdamW update: torch's AdamW step for step, and the same trained head."""

import warnings

import pytest
import torch
from torch import nn

from fuse import fused_update
from fuse.fused_update import FusedBF16AdamW
from fuse.model import Dense
from fuse.train import HeadSettings, autocast, train_head, training_loss
from tests.fuse.test_train import head, noisy_data


def _loss(forward, seed: int) -> torch.Tensor:
    inputs, labels, groups = noisy_data(rows=24, seed=seed)
    with autocast("bf16"):
        return training_loss(forward, inputs, labels, groups, HeadSettings())


def test_each_step_is_torch_adamws_on_the_same_gradients():
    torch.manual_seed(0)
    fused_model, reference_model = head(), head()
    reference_model.load_state_dict(fused_model.state_dict())
    fused = FusedBF16AdamW(fused_model, lr=0.01, weight_decay=0.1)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=0.01, weight_decay=0.1)
    for step, lr in enumerate((0.01, 0.003, 0.02)):
        fused.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = lr
        fused.zero_grad()
        _loss(fused.forward, seed=step).backward()
        # The reference takes the bf16 gradients the fused step read, as float32.
        gradients = [leaf.gradient_slot.buffer.float() for leaf in fused._working_leaves]
        fused.step()
        for parameter, gradient in zip(reference_model.parameters(), gradients, strict=True):
            parameter.grad = gradient
        reference.step()
        for (name, ours), theirs in zip(
            fused_model.named_parameters(), reference_model.parameters(), strict=True
        ):
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)
        working = dict(zip(fused._names, fused._working_leaves, strict=True))
        for name, parameter in fused_model.named_parameters():
            assert torch.equal(working[name], parameter.detach().to(torch.bfloat16)), name


class _Reused(nn.Module):
    """A Dense layer applied twice, then a weight outside any Dense layer, then a layer wide
    enough that its weight gradient is taken from a transposed copy of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = Dense(6, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.wide = Dense(6, fused_update.TRANSPOSED_COPY_MIN_COLUMNS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.relu(self.dense(torch.relu(self.dense(inputs)))) * self.scale)


@pytest.mark.parametrize("network", [head, _Reused], ids=["head", "reused-dense"])
def test_the_backward_writes_autograds_gradients_into_the_flat_buffer(network):
    torch.manual_seed(0)
    model = network()
    fused = FusedBF16AdamW(model, lr=0.01, weight_decay=0.1)

    def loss(forward) -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks
        if network is head:
            return _loss(forward, seed=0)
        return forward(torch.randn(5, 6, dtype=torch.bfloat16)).float().square().sum()

    for _ in range(2):  # the second backward overwrites the first one's gradients
        plain = {
            name: leaf.detach().clone().requires_grad_()
            for name, leaf in zip(fused._names, fused._working_leaves, strict=True)
        }
        fused.zero_grad()
        loss(fused.forward).backward()
        fused.step()  # takes the gradients autograd returned, zeroes unread ones
    written = {
        name: leaf.gradient_slot.buffer
        for name, leaf in zip(fused._names, fused._working_leaves, strict=True)
    }
    loss(lambda *inputs: torch.func.functional_call(model, plain, inputs)).backward()
    for name, leaf in plain.items():
        expected = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        torch.testing.assert_close(written[name], expected, rtol=0, atol=0, msg=name)


@pytest.fixture
def fused_for_every_head(monkeypatch):
    monkeypatch.setattr(fused_update, "FUSED_UPDATE_MIN_PARAMETERS", 1)


def _trained(settings: HeadSettings):
    inputs, labels, groups = noisy_data(rows=200, seed=1)
    torch.manual_seed(0)
    network = head()
    rows = torch.arange(0, 150), torch.arange(150, 200)
    return train_head(network, inputs, labels, groups, *rows, settings, seed=0)


def test_a_head_trained_with_the_fused_update_equals_autocast_adamws(monkeypatch):
    settings = HeadSettings(epochs=8, warmup_epochs=1, learning_rate=0.01, precision="bf16")
    plain = _trained(settings)
    monkeypatch.setattr(fused_update, "FUSED_UPDATE_MIN_PARAMETERS", 1)
    fused = _trained(settings)
    assert fused.best_epoch == plain.best_epoch
    for ours, theirs in zip(fused.history, plain.history, strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-3)
    storages = set()
    for name, parameter in fused.model.named_parameters():
        assert parameter.dtype == torch.float32, name
        storages.add(parameter.untyped_storage().data_ptr())
    # A saved head's tensors must not share memory (safetensors refuses them).
    assert len(storages) == len(list(fused.model.parameters()))


def test_the_update_runs_uncompiled_where_compiling_fails(monkeypatch, fused_for_every_head):
    settings = HeadSettings(epochs=3, warmup_epochs=1, learning_rate=0.01, precision="bf16")
    compiled = _trained(settings)

    def no_compiler(function, **options):
        def fails(*arguments):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(fused_update, "_KERNEL", fused_update._Kernel())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uncompiled = _trained(settings)
    said = [str(warning.message) for warning in caught if "fused bf16" in str(warning.message)]
    assert len(said) == 1 and "InvalidCxxCompiler" in said[0]
    for ours, theirs in zip(uncompiled.history, compiled.history, strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
