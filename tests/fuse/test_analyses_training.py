"""The training table flags heads whose selection the warm-up decided, and fallbacks."""

import numpy as np
from synthetic_predictions import CLASSES, head_rows, runs_record

from fuse.analyses import AnalysisInputs, training


def _record(model, trial, best, first, fallback=False):
    return {
        "model": model,
        "head": "head",
        "trial": trial,
        "fold": 0,
        "learning_rate": 1e-4,
        "best_epoch": best,
        "first_eligible_epoch": first,
        "fallback_to_last_epoch": fallback,
    }


def test_heads_kept_at_their_first_eligible_epoch_are_counted_and_named():
    records = [
        _record("M4", 0, 3, 3),
        _record("M4", 1, 3, 3),
        _record("M1", 0, 3, 3),
        _record("M1", 1, 7, 3, fallback=True),
    ]
    probe = {**_record("M1", 0, None, None), "head": "probe", "fallback_to_last_epoch": None}
    runs = runs_record(["M4", "M1"], [*records, probe])
    table = head_rows("M4", 0, np.linspace(0, 1, 4), ["VCD", "VCD", "GC", "GC"], ["test"] * 4)
    result = training.analyse(AnalysisInputs(table, runs, CLASSES))
    heads = result.tables["heads"].set_index("model")
    assert heads.loc["M4", "kept epoch = first eligible"] == 2
    assert heads.loc["M1", "kept epoch = first eligible"] == 1
    assert heads.loc["M1", "fell back to the last epoch"] == 1
    whole = [note for note in result.notes if note.startswith("Every")]
    assert len(whole) == 1 and whole[0].startswith("Every M4 head kept its first eligible epoch")
    assert any("Fell back" in note and "M1 trial 1 fold 0" in note for note in result.notes)
