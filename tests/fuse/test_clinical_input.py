"""Clinical variables as a third input: M4-clinical in the protocol, saved and applied."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fuse import predict
from fuse.head import FeatureSource, FittedHead
from fuse.protocol import ProtocolConfig, head_path, run
from fuse.schema import PREDICTIONS_FILE
from fuse.train import HeadSettings
from fuse.zoo import protocol_models
from pipeline.clinical import ClinicalColumns
from pipeline.metrics import roc_auc

REPO = Path(__file__).parents[2]
SMALL_HEAD = {
    "epochs": 12,
    "warmup_epochs": 1,
    "learning_rate": 1e-3,
    "image_projection": 16,
    "text_projection": 16,
    "hidden_widths": (16,),
    "contrastive_width": 8,
}
TRIALS = 3


def relabelled_by_age(write_synthetic_cache, folder: Path) -> dict[str, Path]:
    """The synthetic cache with new patient labels that only `age` carries: the image and
    report vectors follow the old labels, so they are noise for the new ones. `sex` is
    noise with blanks."""
    files = write_synthetic_cache(folder, patients=80)
    table = pd.read_csv(files["manifest"], dtype=str, keep_default_na=False)
    rng = np.random.default_rng(1)
    patients = table["patient_id"].unique()
    carcinoma = dict(zip(patients, rng.permutation(np.arange(len(patients)) % 2), strict=True))
    age = {patient: 55 + 12 * carcinoma[patient] + rng.normal(0, 4) for patient in patients}
    sex = dict(zip(patients, rng.choice(["F", "M", ""], len(patients)), strict=True))
    table["label"] = np.where(table["patient_id"].map(carcinoma) == 1, "GC", "VCD")
    table["age"] = table["patient_id"].map(age).round(1).astype(str)
    table["sex"] = table["patient_id"].map(sex)
    table.to_csv(files["manifest"], index=False)
    return files


@pytest.fixture(scope="module")
def clinical_run(tmp_path_factory, cache_writer) -> dict:
    folder = tmp_path_factory.mktemp("clinical")
    files = relabelled_by_age(cache_writer, folder)
    config = ProtocolConfig(
        manifest=str(files["manifest"]),
        features=(str(files["image"]), str(files["text"])),
        out=str(folder / "protocol"),
        heads=str(folder / "models"),
        models=("M4", "M4-clinical"),
        save_models=("M4-clinical",),
        clinical_numeric=("age",),
        clinical_categorical=("sex",),
        trials=TRIALS,
        **SMALL_HEAD,
    )
    run(config)
    table = pd.read_parquet(folder / "protocol" / PREDICTIONS_FILE)
    return {"folder": folder, "files": files, "config": config, "table": table}


def cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *arguments], cwd=REPO, capture_output=True, text=True
    )


def test_a_clinical_column_that_carries_the_label_lifts_m4_clinical_over_m4(clinical_run):
    test = clinical_run["table"][clinical_run["table"]["split"] == "test"]
    aucs = test.groupby(["model", "head", "trial"]).apply(
        lambda rows: roc_auc(rows["label"].eq("GC").to_numpy(), rows["prob_GC"].to_numpy())
    )
    mean = aucs.groupby(["model", "head"]).mean()
    assert aucs.groupby(["model", "head"]).size().eq(TRIALS).all()
    for kind in ("head", "probe"):  # the probes take the clinical columns too
        assert mean["M4-clinical", kind] > 0.9, mean
        assert mean["M4-clinical", kind] > mean["M4", kind] + 0.2, mean


def test_nt_xent_pairs_image_and_report_only(clinical_run):
    head = FittedHead.load(
        head_path(clinical_run["folder"] / "models", "M4-clinical", "head", 0, 0)
    )
    assert set(head.network_.projectors) == {"image0", "text1", "clinical"}
    assert set(head.network_.contrastive) == {"image0", "text1"}
    assert head.network_.projectors["clinical"].out_features == 32  # the default width
    # age (value, missing), sex (F, M, missing): the levels of trial 0's training rows
    assert head.clinical_.feature_names == ("age", "age missing", "sex=F", "sex=M", "sex missing")


def fitted_in_memory(table: pd.DataFrame, kind: str) -> tuple[FittedHead, list[torch.Tensor]]:
    """An M4-clinical head or probe fitted on rows 0-159 (validation 160-239) of `table`."""
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(len(table), 3, generator=generator) for _ in range(2)]
    labels = torch.from_numpy(table["label"].eq("GC").to_numpy().astype(np.int64))
    head = FittedHead(
        protocol_models("blip2-qformer", "llama3", "blip2-vit")["M4-clinical"],
        kind,
        HeadSettings(**SMALL_HEAD),
        clinical=ClinicalColumns(("age",), ("sex",)),
    )
    head.fit(
        vectors,
        labels,
        torch.arange(0, 160),
        torch.arange(160, 240),
        seed=0,
        sources=[
            FeatureSource(encoder, modality, 3, "tiny", None, "mean", "float32", {})
            for encoder, modality in (("blip2-qformer", "image"), ("llama3", "text"))
        ],
        table=table,
    )
    return head, vectors


def test_imputation_comes_from_training_rows_and_sets_the_indicator(clinical_run):
    table = pd.read_csv(clinical_run["files"]["manifest"], dtype=str, keep_default_na=False)
    table.loc[2, "age"] = ""  # a missing training value
    table.loc[200:, "age"] = "1000"  # far-off values outside the training rows
    head, vectors = fitted_in_memory(table, "probe")
    observed = pd.to_numeric(table["age"].iloc[:160], errors="coerce").dropna()
    (age,) = head.clinical_.numeric
    assert age.fill == observed.median() and age.mean == pytest.approx(observed.mean())
    encoded = head.prepared(vectors, table=table)[-1]
    assert encoded[2, 1] == 1 and (encoded[:2, 1] == 0).all()  # the missing indicator
    assert encoded[2, 0] == pytest.approx((observed.median() - observed.mean()) / age.sd)


@pytest.mark.parametrize("kind", ["head", "probe"])
def test_a_saved_m4_clinical_head_loads_as_the_same_head(clinical_run, kind, tmp_path):
    table = pd.read_csv(clinical_run["files"]["manifest"], dtype=str, keep_default_na=False)
    head, vectors = fitted_in_memory(table, kind)
    loaded = FittedHead.load(head.save(tmp_path / "m4-clinical"))
    table.loc[:5, "age"] = ""  # imputed rows
    table.loc[6:9, "sex"] = "X"  # a level the training rows never had
    np.testing.assert_array_equal(
        loaded.predict_proba(vectors, table=table), head.predict_proba(vectors, table=table)
    )
    assert loaded.clinical_ == head.clinical_ and loaded.clinical == head.clinical


def test_fuse_predict_reproduces_the_table_and_refuses_a_manifest_without_the_columns(
    clinical_run, tmp_path, capsys
):
    files, folder = clinical_run["files"], clinical_run["folder"]
    features = [str(files["image"]), str(files["text"])]
    model_heads = str(head_path(folder / "models", "M4-clinical", "head", 0, 0)) + ".json"
    result = predict.run(
        predict.PredictConfig(
            head=(model_heads,), manifest=str(files["manifest"]), features=tuple(features)
        )
    )
    table = clinical_run["table"]
    expected = table[
        (table["model"] == "M4-clinical") & (table["head"] == "head") & (table["trial"] == 0)
    ]
    scored = pd.DataFrame(result["images"])
    np.testing.assert_allclose(scored["prob_GC"], expected["prob_GC"], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    other_level = tmp_path / "other_level.csv"
    changed = pd.read_csv(files["manifest"], dtype=str, keep_default_na=False)
    changed.loc[:3, "sex"] = "X"
    changed.to_csv(other_level, index=False)
    predict.run(
        predict.PredictConfig(
            head=(model_heads,), manifest=str(other_level), features=tuple(features)
        )
    )
    assert "warning: clinical column 'sex': 'X' (4 rows) never seen" in capsys.readouterr().err
    without = tmp_path / "without_age.csv"
    pd.read_csv(files["manifest"], dtype=str, keep_default_na=False).drop(columns="age").to_csv(
        without, index=False
    )
    done = cli(
        "fuse",
        "predict",
        "--head",
        model_heads,
        "--manifest",
        str(without),
        "--features",
        *features,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: manifest {without}: clinical column(s) 'age' missing (declared by "
        "clinical_numeric / clinical_categorical, or taken by the head applied); add them to "
        "the manifest"
    ]


def test_a_malformed_clinical_column_is_refused_in_one_line_by_the_protocol(clinical_run, tmp_path):
    files = clinical_run["files"]
    table = pd.read_csv(files["manifest"], dtype=str, keep_default_na=False)
    table.loc[[3, 7], "age"] = ["61 years", "?"]
    bad = tmp_path / "bad_age.csv"
    table.to_csv(bad, index=False)
    done = cli(
        *("fuse", "protocol", "--manifest", str(bad), "--out", str(tmp_path / "p")),
        *("--features", str(files["image"]), str(files["text"])),
        *("--models", "M4-clinical", "--clinical-numeric", "age", "--trials", "1"),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: manifest {bad}, column 'age': not a number ('61 years', '?') at line(s) 5, 9;"
    ), done.stderr
    assert not (tmp_path / "p").exists()


def test_extract_predict_refuses_a_clinical_head_before_any_encoder_runs(clinical_run, tmp_path):
    heads = clinical_run["folder"] / "models" / "M4-clinical"
    image = tmp_path / "exam.png"
    image.write_bytes(b"not read: the head is refused first")
    done = cli("extract.predict", "--head", str(heads), "--images", str(image), "--report", "x")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(
        "error: ensemble of 3 M4-clinical heads (trials 0, 1, 2; mean probability, mean "
        "threshold) also takes the clinical columns age, sex, which image files and a report "
        "do not give"
    ), done.stderr
