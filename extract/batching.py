"""How the items of a run become batches: the plan that parts, resumption and the
processes share.

A plan is a list of batches (tuples of item keys). It depends only on the items to
encode, the batch size, the token lengths of reports and the plan of an interrupted run,
never on the number of processes: every batch is encoded with the same neighbours
whether one process or eight run it, so the vectors are the same.

Reports are sorted by token length (longest first, so a batch too large for memory
fails at once) before they are cut into batches: a batch then pads its reports to a
length close to their own, instead of to the longest report of a random batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from extract.parts import Batch


def plan_batches(
    keys: Sequence[str],
    batch_size: int,
    previous: Sequence[Batch] = (),
    token_lengths: Mapping[str, int] | None = None,
) -> list[Batch]:
    """Cut `keys` into batches, keeping the batches of an interrupted run's plan.

    Args:
        keys: the items to encode, in the order of first appearance.
        batch_size: items per batch.
        previous: an earlier plan; each of its batches whose items all remain to be
            encoded is kept as it was, so its finished part is reused and the rest is
            encoded as the uninterrupted run would have.
        token_lengths: tokens per report key; given, the items not in a kept batch are
            sorted by it (longest first; ties in order of first appearance).

    Returns:
        The kept batches, then the new ones.
    """
    wanted = set(keys)
    kept = [batch for batch in previous if set(batch) <= wanted]
    planned = {key for batch in kept for key in batch}
    rest = [key for key in keys if key not in planned]
    if token_lengths is not None:
        rest.sort(key=lambda key: -token_lengths[key])
    return kept + [
        tuple(rest[start : start + batch_size]) for start in range(0, len(rest), batch_size)
    ]


def padding_share(batches: Sequence[Batch], token_lengths: Mapping[str, int]) -> float:
    """Padded positions / all positions when each batch is padded to its longest report."""
    positions = sum(max(token_lengths[key] for key in batch) * len(batch) for batch in batches)
    tokens = sum(token_lengths[key] for batch in batches for key in batch)
    return (positions - tokens) / positions if positions else 0.0
