import math

import torch

from fuse.losses import nt_xent


def reference_nt_xent(image, text, groups, temperature):
    """The loss written out anchor by anchor, straight from the formula."""
    z = torch.nn.functional.normalize(torch.cat([image, text]), dim=-1)
    count = len(image)
    group_of = torch.cat([groups, groups]).tolist()
    losses = []
    for i in range(2 * count):
        j = (i + count) % (2 * count)
        denominator = sum(
            math.exp(float(z[i] @ z[k]) / temperature)
            for k in range(2 * count)
            if k != i and (k == j or group_of[k] != group_of[i])
        )
        losses.append(-(float(z[i] @ z[j]) / temperature - math.log(denominator)))
    return sum(losses) / len(losses)


def test_matches_the_formula_with_shared_reports_excluded_from_negatives():
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    groups = torch.tensor([0, 0, 1, 2, 2])
    expected = reference_nt_xent(image, text, groups, 0.5)
    assert math.isclose(nt_xent(image, text, groups, 0.5).item(), expected, rel_tol=1e-5)


def test_pairs_sharing_a_report_do_not_push_each_other_apart():
    # Two images of one report whose texts are identical: without the mask the twin
    # text would count as a hard negative; with it the aligned pairs cost almost nothing.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = image.clone()
    shared = nt_xent(image, text, torch.tensor([0, 0, 1]), 0.05).item()
    unshared = nt_xent(image, text, torch.tensor([0, 1, 2]), 0.05).item()
    assert shared < 1e-6
    assert unshared > 0.5
