"""The exam-level head (M4-exam): attention over an exam's images, through FittedHead."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from fuse import report
from fuse.exam_model import ExamFusionHead, ExamLayout, exam_inputs
from fuse.head import FeatureSource, FittedHead
from fuse.predict import PredictConfig
from fuse.predict import run as predict_run
from fuse.protocol import ProtocolConfig, head_path, run
from fuse.schema import ATTENTION_COLUMN, read_predictions
from fuse.train import HeadSettings
from fuse.zoo import protocol_models
from pipeline.errors import UserError
from pipeline.metrics import (
    choose_threshold,
    roc_auc,
    threshold_for_sensitivity,
    threshold_for_specificity,
)

MODELS = protocol_models("blip2-qformer", "llama3", "blip2-vit")
WIDTH = 8
TINY = HeadSettings(
    image_projection=16,
    text_projection=16,
    hidden_widths=(32,),
    contrastive_width=8,
    attention_width=16,
    epochs=30,
    warmup_epochs=1,
    learning_rate=3e-3,
    patience=0,
    # the exam head has no modality dropout: the pair heads it is compared with neither
    modality_dropout=0.0,
)


def key_image_exams(exams=240, seed=0):
    """Exams of 4-8 images where one image per exam shows the lesion (a marker in feature
    0) and carries the class (+-2 in feature 1); the other images and the report are noise.

    Returns:
        image and report vectors per row, labels, each row's exam, which rows are the key
        images, and the exam sizes.
    """
    generator = torch.Generator().manual_seed(seed)
    exam_labels = torch.arange(exams) % 2
    sizes = torch.randint(4, 9, (exams,), generator=generator)
    exam_of_row = torch.repeat_interleave(torch.arange(exams), sizes)
    images = torch.randn(len(exam_of_row), WIDTH, generator=generator)
    starts = torch.cumsum(sizes, 0) - sizes
    key = starts + (torch.rand(exams, generator=generator) * sizes).long()
    images[key, 0] += 4.0
    images[key, 1] += (2 * exam_labels - 1).float() * 2.0
    reports = torch.randn(exams, WIDTH, generator=generator)[exam_of_row]
    is_key = torch.zeros(len(exam_of_row), dtype=torch.bool)
    is_key[key] = True
    return images, reports, exam_labels[exam_of_row], exam_of_row, is_key, sizes


def rows_of(exam_of_row, exams):
    return torch.nonzero(torch.isin(exam_of_row, exams)).squeeze(1)


def sources():
    return [
        FeatureSource("blip2-qformer", "image", WIDTH, "tiny", "aa", "mean", "float32", {}),
        FeatureSource("llama3", "text", WIDTH, "tiny", "bb", "mean", "float32", {}),
    ]


def fit_on_exams(model, kind, images, reports, labels, exam_of_row, settings=TINY):
    head = FittedHead(MODELS[model], kind, settings)
    return head.fit(
        [images, reports],
        labels,
        rows_of(exam_of_row, torch.arange(0, 160)),
        rows_of(exam_of_row, torch.arange(160, 200)),
        seed=0,
        sources=sources(),
        exams=exam_of_row.numpy(),
    )


def exam_auc(scores, labels, exam_of_row, rows):
    frame = pd.DataFrame(
        {"exam": exam_of_row[rows], "score": scores[rows], "label": labels[rows]}
    ).groupby("exam")
    means = frame.mean()
    return roc_auc(means["label"].to_numpy(), means["score"].to_numpy())


def test_attention_finds_the_one_informative_image_and_beats_mean_pooling():
    # The case attention pooling is for: the evidence is in one image per exam. Mean
    # pooling an image-level head's scores (M4, same inputs) dilutes it with the noise of
    # the other images; the exam head should weigh the key image up and rank exams better.
    # Both train with the same settings, so pooling is the one difference.
    images, reports, labels, exam_of_row, is_key, sizes = key_image_exams()
    exam_head = fit_on_exams("M4-exam", "head", images, reports, labels, exam_of_row)
    image_head = fit_on_exams("M4", "head", images, reports, labels, exam_of_row)
    probabilities, attention = exam_head.predict_with_attention(
        [images, reports], exams=exam_of_row.numpy()
    )
    size_of_row = sizes[exam_of_row].numpy()
    # weight relative to uniform (1 / exam size): 1 for an exam head that averages
    assert (attention[is_key.numpy()] * size_of_row[is_key.numpy()]).mean() > 2.0
    test = rows_of(exam_of_row, torch.arange(200, 240)).numpy()
    by_attention = exam_auc(probabilities[:, 1], labels.numpy(), exam_of_row.numpy(), test)
    by_mean = exam_auc(
        image_head.predict_proba([images, reports])[:, 1],
        labels.numpy(),
        exam_of_row.numpy(),
        test,
    )
    assert by_attention > by_mean + 0.1, (by_attention, by_mean)


def test_attention_sums_to_one_per_exam_and_padding_gets_none():
    generator = torch.Generator().manual_seed(1)
    exams = torch.tensor([3, 0, 1, 3, 3, 2, 0, 1, 3, 3])  # interleaved, sizes 2, 2, 1, 5
    layout = ExamLayout.of(exams.numpy())
    rows = torch.arange(len(exams))
    torch.testing.assert_close(layout.members[layout.exam_of_row, layout.position_of_row], rows)
    network = ExamFusionHead(
        pooled="image0",
        attention_width=8,
        input_widths={"image0": WIDTH, "text1": WIDTH},
        projections={"image0": 16, "text1": 16},
        hidden_widths=(16,),
        dropout=0.0,
        num_classes=2,
        contrastive_width=8,
    ).eval()
    images, reports = torch.randn(10, WIDTH, generator=generator), torch.randn(10, WIDTH)
    inputs = exam_inputs([images, reports], layout, [True, False])
    with torch.no_grad():
        logits, attention = network.attend(inputs)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(4))
    assert (attention[~layout.mask] == 0).all() and (attention[layout.mask] > 0).all()
    # Whatever lies in the padding changes nothing.
    filled = inputs[0].clone()
    filled[~layout.mask] = 1e4
    with torch.no_grad():
        logits_filled, attention_filled = network.attend([filled, *inputs[1:]])
    torch.testing.assert_close(logits_filled, logits)
    torch.testing.assert_close(attention_filled, attention)


def test_fitted_exam_head_gives_each_row_its_exam_and_chooses_cuts_on_validation_exams():
    images, reports, labels, exam_of_row, _, _ = key_image_exams(exams=200, seed=2)
    shuffle = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, reports, labels, exam_of_row = (
        x[shuffle] for x in (images, reports, labels, exam_of_row)
    )
    dropping = replace(TINY, modality_dropout=0.3)
    head = fit_on_exams("M4-exam", "head", images, reports, labels, exam_of_row, dropping)
    probabilities, attention = head.predict_with_attention(
        [images, reports], exams=exam_of_row.numpy()
    )
    frame = pd.DataFrame(
        {"exam": exam_of_row, "p": probabilities[:, 1], "a": attention, "label": labels}
    )
    np.testing.assert_allclose(frame.groupby("exam")["a"].sum(), 1.0, atol=1e-5)
    assert (frame.groupby("exam")["p"].nunique() == 1).all()
    val = frame[frame["exam"].between(160, 199)].groupby("exam").first()
    val_labels, val_scores = val["label"].to_numpy(), val["p"].to_numpy()
    assert head.thresholds_ == {
        "youden": choose_threshold(val_labels, val_scores),
        "0.5": 0.5,
        "sensitivity": threshold_for_sensitivity(val_labels, val_scores, 0.95),
        "specificity": threshold_for_specificity(val_labels, val_scores, 0.95),
    }
    with pytest.raises(ValueError, match="scores whole exams"):
        head.predict_proba([images, reports])
    # modality dropout (on by default) has no exam-level counterpart: every input is read
    assert head.inputs_used_ == (True, True)
    with pytest.raises(ValueError, match="only some of their rows"):
        FittedHead(MODELS["M4-exam"], "probe", TINY).fit(
            [images, reports],
            labels,
            torch.arange(0, 300),  # cuts exams apart
            rows_of(exam_of_row, torch.arange(160, 200)),
            seed=0,
            sources=sources(),
            exams=exam_of_row.numpy(),
        )


@pytest.mark.parametrize("kind", ["head", "probe"])
def test_a_saved_exam_head_loads_with_the_same_probabilities_and_attention(kind, tmp_path):
    images, reports, labels, exam_of_row, _, _ = key_image_exams(exams=200, seed=3)
    head = fit_on_exams("M4-exam", kind, images, reports, labels, exam_of_row)
    loaded = FittedHead.load(head.save(tmp_path / "exam"))
    for ours, theirs in zip(
        head.predict_with_attention([images, reports], exams=exam_of_row.numpy()),
        loaded.predict_with_attention([images, reports], exams=exam_of_row.numpy()),
        strict=True,
    ):
        np.testing.assert_array_equal(theirs, ours)
    assert loaded.thresholds_ == head.thresholds_
    assert loaded.scores_exams and loaded.settings.attention_width == TINY.attention_width
    if kind == "head":  # Grad-CAM explains heads of pairs; it says so for an exam head
        from extract.explain import image_encoder_spec

        with pytest.raises(UserError, match="scores whole exams"):
            image_encoder_spec(loaded)


def test_protocol_writes_exam_rows_with_attention_and_the_saved_head_predicts_them(
    synthetic_cache, tmp_path
):
    features = (str(synthetic_cache["image"]), str(synthetic_cache["text"]))
    config = ProtocolConfig(
        manifest=str(synthetic_cache["manifest"]),
        features=features,
        out=str(tmp_path / "p"),
        heads=str(tmp_path / "models"),
        models=("M4-exam", "M1"),
        save_models=("M4-exam",),
        trials=1,
        epochs=6,
        warmup_epochs=1,
        learning_rate=1e-3,
    )
    run(config)
    table = read_predictions(tmp_path / "p", ("VCD", "GC"))  # the observed rows
    exam_rows = table[(table["model"] == "M4-exam") & (table["head"] == "head")]
    manifest = pd.read_csv(synthetic_cache["manifest"])
    assert len(exam_rows) == len(manifest)  # one row per pair, as for every model
    assert table.loc[table.index.difference(exam_rows.index), ATTENTION_COLUMN].isna().all()
    exams = exam_rows.groupby(["patient_id", "exam_id"])
    np.testing.assert_allclose(exams[ATTENTION_COLUMN].sum(), 1.0, atol=1e-5)
    assert (exams["prob_GC"].nunique() == 1).all()
    # The modality analyses' rows and attribution shares reach the exam head too: one
    # probability per exam under each condition, and the exam's shares on every row.
    every = read_predictions(tmp_path / "p", ("VCD", "GC"), conditions=True)
    conditioned = every[(every["model"] == "M4-exam") & (every["condition"] != "observed")]
    assert {"image_permuted", "text_swapped"} <= set(conditioned["condition"])
    per_exam = conditioned.groupby(["head", "condition", "patient_id", "exam_id"])["prob_GC"]
    assert (per_exam.nunique() == 1).all()
    shares = exam_rows["attribution_image"] + exam_rows["attribution_text"]
    np.testing.assert_allclose(shares, 1.0, atol=1e-5)
    assert (exams["attribution_image"].nunique() == 1).all()
    saved = head_path(tmp_path / "models", "M4-exam", "head", 0, 0).with_suffix(".json")
    predicted = predict_run(
        PredictConfig(head=(str(saved),), manifest=config.manifest, features=features)
    )
    np.testing.assert_allclose(
        [image["prob_GC"] for image in predicted["images"]], exam_rows["prob_GC"], atol=1e-6
    )
    report.run(
        report.ReportConfig(
            protocol=str(tmp_path / "p"), out=str(tmp_path / "r"), bootstrap_resamples=20
        )
    )
    tables = (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")
    assert "Exam-level models (M4-exam) score whole exams" in tables
    assert "comparable level is the exam level" in tables
