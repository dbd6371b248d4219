"""NT-Xent between the image and the report of each pair."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def nt_xent(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    report_groups: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Normalised-temperature cross-entropy over the 2N embeddings of N pairs.

    The positive of image i is text i and vice versa. Every other embedding is a
    negative, except those of pairs that share i's report: several images of one
    examination share one report, so they are not evidence against each other.

    Args:
        image_embeddings: [N, D].
        text_embeddings: [N, D].
        report_groups: [N]; equal values mean the pairs share a report.
        temperature: the softmax temperature tau.

    Returns:
        The mean loss over the 2N anchors.
    """
    count = image_embeddings.shape[0]
    embeddings = F.normalize(torch.cat([image_embeddings, text_embeddings]), dim=-1)
    similarity = embeddings @ embeddings.T / temperature
    groups = torch.cat([report_groups, report_groups])
    same_report = groups[:, None] == groups[None, :]
    positive = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(
        embeddings.device
    )
    # Same-report entries (the anchor itself included) leave the denominator, the
    # positive stays.
    excluded = same_report.clone()
    excluded[torch.arange(2 * count), positive] = False
    similarity = similarity.masked_fill(excluded, float("-inf"))
    return F.cross_entropy(similarity, positive)
