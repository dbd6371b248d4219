"""fuse.model.Dropout: nn.Dropout's masks, outputs and gradients, bit for bit."""

import pytest
import torch
from torch import nn

from fuse.model import Dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.3, 0.5, 1.0])
def test_dropout_equals_torchs_bit_for_bit(dtype, p):
    inputs = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    upstream = torch.randn(64, 96, dtype=dtype)
    results = []
    for module in (nn.Dropout(p), Dropout(p)):
        torch.manual_seed(7)
        outputs = [module(inputs) for _ in range(3)]  # consecutive draws stay in step
        (gradient,) = torch.autograd.grad(outputs[1], inputs, upstream)
        results.append((outputs, gradient, torch.rand(()).item()))
    (theirs, their_gradient, their_next), (ours, our_gradient, our_next) = results
    for their_output, our_output in zip(theirs, ours, strict=True):
        assert torch.equal(their_output, our_output)
    assert torch.equal(their_gradient, our_gradient)
    assert their_next == our_next  # the generator has advanced as far
    if p < 1:
        assert 0 < (ours[0] == 0).float().mean() < 1


def test_dropout_is_the_identity_in_eval_and_refuses_bad_probabilities():
    inputs = torch.randn(8, 4)
    assert Dropout(0.5).eval()(inputs) is inputs
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)
