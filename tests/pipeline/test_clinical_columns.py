"""Clinical columns: what the manifest check refuses, and what the encoding learns from
which rows."""

import numpy as np
import pandas as pd
import pytest

from pipeline.clinical import ClinicalColumns, ClinicalEncoding, check_clinical_columns
from pipeline.errors import UserError
from pipeline.manifest import LINE_COLUMN

DECLARED = ClinicalColumns(numeric=("age",), categorical=("smoking",))


def rows(age, smoking):
    table = pd.DataFrame({"age": age, "smoking": smoking})
    table[LINE_COLUMN] = table.index + 2
    return table


def test_text_in_a_numeric_column_names_the_column_the_value_and_the_lines():
    table = rows(["61", "sixty", "", "58", "n/a"], ["never"] * 5)
    with pytest.raises(UserError) as refused:
        check_clinical_columns("m.csv", table, DECLARED)
    assert str(refused.value).startswith(
        "manifest m.csv, column 'age': not a number ('sixty', 'n/a') at line(s) 3, 6;"
    )
    check_clinical_columns("m.csv", rows(["61", " 7.5 ", ""], ["a", "", "b"]), DECLARED)


def test_a_declared_column_the_manifest_lacks_and_bad_declarations_are_refused():
    table = rows(["61"], ["never"]).drop(columns="smoking")
    with pytest.raises(UserError, match="column.*'smoking' missing .declared by clinical_numeric"):
        check_clinical_columns("m.csv", table, DECLARED)
    with pytest.raises(UserError, match="label are manifest columns"):
        check_clinical_columns("m.csv", table, ClinicalColumns(categorical=("label",)))
    with pytest.raises(UserError, match="age declared twice"):
        check_clinical_columns("m.csv", table, ClinicalColumns(("age",), ("age",)))


def test_missing_values_are_refused_only_when_the_policy_says_so():
    table = rows(["61", "", "70"], ["never", "current", "current"])
    check_clinical_columns("m.csv", table, DECLARED)
    refuse = ClinicalColumns(("age",), ("smoking",), missing="refuse")
    with pytest.raises(UserError, match=r"column 'age': missing value at line\(s\) 3;"):
        check_clinical_columns("m.csv", table, refuse)


@pytest.mark.parametrize("policy", ["median", "mean"])
def test_imputation_standardisation_levels_and_indicators(policy):
    train = rows(["50", "60", "", "90"], ["never", "current", "", "current"])
    encoding = ClinicalEncoding.fit(train, ClinicalColumns(("age",), ("smoking",), policy))
    observed = np.array([50.0, 60.0, 90.0])
    fill = np.median(observed) if policy == "median" else observed.mean()
    assert encoding.numeric[0].fill == fill
    assert encoding.numeric[0].mean == observed.mean()
    assert encoding.categorical[0].levels == ("current", "never")
    assert encoding.feature_names == (
        "age",
        "age missing",
        "smoking=current",
        "smoking=never",
        "smoking missing",
    )
    others = rows(["", "1000", "55"], ["former", "", " never "])
    encoded = encoding.encode(others)
    sd = observed.std()
    np.testing.assert_allclose(encoded[:, 0], (np.array([fill, 1000, 55]) - observed.mean()) / sd)
    np.testing.assert_array_equal(encoded[:, 1], [1, 0, 0])  # age missing
    np.testing.assert_array_equal(encoded[:, 2:], [[0, 0, 0], [0, 0, 1], [0, 1, 0]])
    # "former" is no level of the training rows: neither a level nor missing, and named
    assert encoding.unseen_levels(others) == {"smoking": {"former": 1}}


def test_an_encoding_is_plain_data_that_reads_back_exactly():
    train = rows(["50.1", "60.7", "", "91.3"], ["never", "current", "", "current"])
    encoding = ClinicalEncoding.fit(train, DECLARED)
    assert ClinicalEncoding.from_dict(encoding.to_dict()) == encoding
    with pytest.raises(UserError, match="lacks clinical column.*'smoking'"):
        encoding.encode(train.drop(columns="smoking"))


def test_a_numeric_column_without_training_values_is_refused():
    with pytest.raises(UserError, match="'age' has no value in the 2 training rows"):
        ClinicalEncoding.fit(rows(["", " "], ["a", "b"]), DECLARED)
