"""A test hook, and nothing else: kill this process at a named point of a write.

Tests of crash safety set VLMF_EXTRACT_PAUSE_AT=POINT:N (e.g. `part-write:3`) and the
process SIGKILLs itself the N-th time it reaches POINT, as a power cut or an OOM kill
would stop it. Points: `batch` (a batch is encoded, its part not yet written),
`plan-write` and `part-write` (the plan's or a part's temporary file is written, not yet
renamed) and `consolidate` (the feature file's temporary file is written, not yet
renamed). Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENVIRONMENT_VARIABLE = "VLMF_EXTRACT_PAUSE_AT"
_reached: Counter[str] = Counter()


def reached(point: str) -> None:
    """Count one arrival at `point`; SIGKILL this process if the hook names this arrival."""
    wanted = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if not wanted.startswith(point + ":"):
        return
    _reached[point] += 1
    if _reached[point] == int(wanted.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)
