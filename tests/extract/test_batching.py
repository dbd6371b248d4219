"""Reports are batched by token length (little padding); key order stays the manifest's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cache.store import read_features
from extract.batching import padding_share, plan_batches
from extract.run import ExtractConfig, run
from pipeline.keys import text_key


def test_plan_sorts_by_length_longest_first_ties_in_manifest_order() -> None:
    lengths = {"a": 3, "b": 9, "c": 3, "d": 7, "e": 9}
    assert plan_batches(list("abcde"), 2, token_lengths=lengths) == [
        ("b", "e"),
        ("d", "a"),
        ("c",),
    ]
    assert plan_batches(list("abcde"), 2) == [("a", "b"), ("c", "d"), ("e",)]


def test_plan_keeps_an_earlier_plan_s_batches_whose_items_all_remain() -> None:
    previous = [("b", "e"), ("d", "a"), ("c",)]
    # "a" is gone: its batch is planned again; "f" is new.
    assert plan_batches(list("bcdef"), 2, previous) == [("b", "e"), ("c",), ("d", "f")]


def test_padding_share_counts_padded_positions() -> None:
    lengths = {"a": 2, "b": 6, "c": 6}
    assert padding_share([("a", "b"), ("c",)], lengths) == 4 / 18
    assert padding_share([("b", "c"), ("a",)], lengths) == 0


def test_sorted_batches_pad_less_and_keep_keys_in_manifest_order(
    write_manifest: Callable[[pd.DataFrame], Path], tmp_path: Path
) -> None:
    reports = [("声带" * (2 + 9 * (row % 2))) + f"第{row}例。" for row in range(8)]
    table = pd.DataFrame(
        {
            "image_path": "images/a.png",
            "report_text": reports,  # short, long, short, long, ...
            "label": "VCD",
            "patient_id": "p1",
        }
    )
    manifest = write_manifest(table)
    config = ExtractConfig(
        model="llama3", manifest=str(manifest), out=str(tmp_path / "t.h5"), batch_size=2
    )
    features = read_features(run(config))
    assert list(features.keys) == [text_key(report) for report in reports]
    record = features.provenance["run"]
    assert record["padding_share"] < record["padding_share_unsorted"] / 2

    one_by_one = read_features(
        run(ExtractConfig(**{**vars(config), "out": str(tmp_path / "one.h5"), "batch_size": 1}))
    )
    assert one_by_one.provenance["run"]["padding_share"] == 0
    np.testing.assert_allclose(features.vectors, one_by_one.vectors, atol=1e-5, rtol=1e-5)
