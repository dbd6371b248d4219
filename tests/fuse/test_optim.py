"""AdamW on float32 master weights of a bfloat16 network: torch.optim.AdamW's arithmetic."""

import copy
import os

import pytest
import torch
from torch import nn

from fuse.optim import MasterWeightAdamW, master_weights_available

pytestmark = pytest.mark.skipif(
    not master_weights_available() and not os.environ.get("CI"),
    reason="Inductor cannot compile a kernel here (no C++ compiler); CI must have one",
)


def test_steps_equal_adamw_on_float32_weights_and_the_network_computes_in_bfloat16():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    network = copy.deepcopy(reference)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    master = MasterWeightAdamW(network, lr=1e-2, weight_decay=0.1)
    schedules = [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5) for opt in (adamw, master)]
    assert {parameter.dtype for parameter in network.parameters()} == {torch.bfloat16}
    for _ in range(6):
        gradients = [torch.randn_like(p).to(torch.bfloat16) for p in reference.parameters()]
        for parameter, gradient in zip(reference.parameters(), gradients, strict=True):
            parameter.grad = gradient.float()
        for parameter, gradient in zip(network.parameters(), gradients, strict=True):
            parameter.grad = gradient.clone()
        adamw.step()
        master.step()
        for schedule in schedules:
            schedule.step()
    weights = master.master_state_dict()
    for name, parameter in reference.named_parameters():
        assert weights[name].dtype == torch.float32
        torch.testing.assert_close(weights[name], parameter.detach(), rtol=0, atol=1e-6)
        # what the network computes with is the master weight rounded to bfloat16
        assert torch.equal(network.state_dict()[name], weights[name].to(torch.bfloat16))
    assert not torch.equal(weights["0.weight"], copy.deepcopy(network)[0].weight.float())
