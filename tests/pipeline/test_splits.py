import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.splits import assign_splits


def manifest(patients: int = 100, images: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"patient_id": f"P{p}", "label": "GC" if p % 3 else "VCD", "split": ""}
            for p in range(patients)
            for _ in range(images)
        ]
    )


def test_patient_never_crosses_splits_and_shares_are_8_1_1():
    table = manifest()
    table["split"] = assign_splits(table, seed=3)
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    patients = table.drop_duplicates("patient_id")
    counts = patients["split"].value_counts()
    assert counts["train"] == 80 and counts["val"] == 10 and counts["test"] == 10


def test_split_is_stratified_by_label():
    table = manifest()
    table["split"] = assign_splits(table, seed=0)
    patients = table.drop_duplicates("patient_id")
    for label, count in patients["label"].value_counts().items():
        of_label = patients[patients["label"] == label]["split"].value_counts()
        assert of_label["train"] == round(0.8 * count)
        assert of_label["val"] == round(0.1 * count)


def test_seed_decides_the_split():
    table = manifest()
    first, again, other = (assign_splits(table, seed=s) for s in (1, 1, 2))
    assert first.equals(again)
    assert not first.equals(other)


def test_given_splits_are_kept():
    table = manifest(20)
    table.loc[table["patient_id"] == "P0", "split"] = "external"
    splits = assign_splits(table, seed=0)
    assert (splits[table["patient_id"] == "P0"] == "external").all()
    assert set(splits[table["patient_id"] != "P0"]) <= {"train", "val", "test"}


def test_bad_fractions():
    with pytest.raises(UserError, match="summing to 1"):
        assign_splits(manifest(10), fractions=(0.8, 0.3, 0.1))
