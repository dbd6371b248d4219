"""The fitted head: what fit learns from which rows, and that a saved head is the same head."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression

from fuse.head import FeatureSource, FittedHead
from fuse.protocol import ProtocolConfig, head_path, run
from fuse.schema import read_predictions
from fuse.train import HeadSettings
from fuse.zoo import protocol_models
from pipeline.errors import UserError
from pipeline.metrics import choose_threshold

REPO = Path(__file__).parents[2]
MODELS = protocol_models("blip2-qformer", "llama3", "blip2-vit")
FAST = HeadSettings(epochs=6, warmup_epochs=1, learning_rate=1e-3, patience=0)
CLASSES = ("VCD", "GC")


def source(encoder="blip2-qformer", modality="image", width=4, fingerprint="aa" * 32):
    return FeatureSource(encoder, modality, width, "tiny", fingerprint, "mean", "float32", {})


def separable(rows=120, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % 2
    vectors = torch.randn(rows, width, generator=generator) + labels[:, None] * 1.5
    return vectors, labels


def fitted(kind, vectors, labels, **fit_options):
    head = FittedHead(MODELS["M1"], kind, FAST, CLASSES)
    return head.fit(
        [vectors],
        labels,
        torch.arange(0, 80),
        torch.arange(80, 100),
        seed=0,
        sources=[source(width=vectors.shape[1])],
        **fit_options,
    )


def test_standardisation_uses_training_rows_only():
    vectors, labels = separable()
    head = fitted("probe", vectors, labels)
    (stats,) = head.standardisation_
    torch.testing.assert_close(stats["mean"], vectors[:80].mean(dim=0))
    shifted = vectors.clone()
    shifted[100:] += 1000.0  # rows outside training must not move the statistics
    (moved,) = fitted("probe", shifted, labels).standardisation_
    torch.testing.assert_close(moved["mean"], stats["mean"])
    (prepared,) = head.prepared([vectors])
    torch.testing.assert_close(prepared[:80].mean(dim=0), torch.zeros(4), atol=1e-5, rtol=0)


def test_each_external_site_is_centred_on_its_own_and_other_rows_stay():
    vectors, labels = separable()
    vectors[100:110] += 7.0  # one external site's offset
    vectors[110:] -= 3.0  # another's
    sites = {"b": torch.arange(100, 110), "c": torch.arange(110, 120)}
    head = fitted("probe", vectors, labels, external_sites=sites)
    row_sites = [None] * 100 + ["b"] * 10 + ["c"] * 10
    (prepared,) = head.prepared([vectors], row_sites)
    (uncentred,) = head.prepared([vectors], row_sites, centring="none")
    for rows in sites.values():
        torch.testing.assert_close(prepared[rows].mean(dim=0), prepared[:80].mean(dim=0))
        # a shift only: differences within the site are kept
        torch.testing.assert_close(
            prepared[rows] - prepared[rows][0], uncentred[rows] - uncentred[rows][0]
        )
    torch.testing.assert_close(prepared[:100], uncentred[:100], atol=0, rtol=0)
    # A calibration batch of a new site gives the same shift as the stored one.
    (batch,) = head.prepared([vectors[100:110]], ["b"] * 10, centring="batch")
    torch.testing.assert_close(batch, prepared[100:110])


def test_the_probe_fits_training_rows_only():
    vectors, labels = separable()
    head = fitted("probe", vectors, labels)
    (prepared,) = head.prepared([vectors])
    expected = LogisticRegression(C=head.probe_.c, max_iter=2000, random_state=0)
    expected.fit(prepared[:80].double().numpy(), labels[:80].numpy())
    np.testing.assert_allclose(head.probe_.coef, expected.coef_, rtol=1e-3, atol=1e-4)
    # The probe's fit starts from the previous C's weights, so it stops within lbfgs's
    # tolerance of this cold fit, not on the same bits.
    np.testing.assert_allclose(
        head.predict_proba([vectors]), expected.predict_proba(prepared.double().numpy()), atol=1e-3
    )


@pytest.mark.parametrize("kind", ["head", "probe"])
def test_thresholds_come_from_validation_rows(kind):
    vectors, labels = separable()
    head = fitted(kind, vectors, labels)
    scores = head.predict_proba([vectors])[:, 1]
    assert head.threshold_ == choose_threshold(labels[80:100].numpy(), scores[80:100])
    sensitivity = scores[80:100][labels[80:100].numpy() == 1] >= head.thresholds_["sensitivity"]
    assert sensitivity.mean() >= 0.95


@pytest.mark.parametrize("kind", ["head", "probe"])
def test_a_saved_head_loads_as_the_same_head(kind, tmp_path):
    vectors, labels = separable()
    vectors[100:] += 5.0
    head = fitted(kind, vectors, labels, external_sites={"b": torch.arange(100, 120)})
    sites = [None] * 100 + ["b"] * 20
    path = head.save(tmp_path / "m1")
    loaded = FittedHead.load(path)
    np.testing.assert_array_equal(
        loaded.predict_proba([vectors], sites), head.predict_proba([vectors], sites)
    )
    assert loaded.thresholds_ == head.thresholds_ and loaded.sources_ == head.sources_
    tensors = load_file(str(tmp_path / "m1.safetensors"))
    assert not any(name.endswith(".py") for name in tensors)  # tensors only


def test_heads_whose_names_hold_a_dot_are_saved_side_by_side(tmp_path):
    """The protocol names a head on half the training patients trialT-foldF-fraction0.5-KIND:
    the dot must not be taken for a suffix, or the head and probe overwrite each other."""
    vectors, labels = separable()
    for kind in ("head", "probe"):
        fitted(kind, vectors, labels).save(tmp_path / f"trial0-fold0-fraction0.5-{kind}")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"trial0-fold0-fraction0.5-{kind}{suffix}"
        for kind in ("head", "probe")
        for suffix in (".json", ".safetensors")
    ]
    loaded = FittedHead.load(tmp_path / "trial0-fold0-fraction0.5-probe.json")
    assert loaded.kind == "probe"


@pytest.mark.parametrize("kind", ["head", "probe"])
def test_a_head_saved_before_input_selection_still_loads_and_reads_every_input(kind, tmp_path):
    vectors, labels = separable()
    head = fitted(kind, vectors, labels)
    path = head.save(tmp_path / "old")
    tensors = load_file(str(tmp_path / "old.safetensors"))
    save_file(
        {name: value for name, value in tensors.items() if not name.startswith("absent.")},
        str(tmp_path / "old.safetensors"),
    )
    config = json.loads(path.read_text())
    del config["inputs_used"]
    path.write_text(json.dumps(config))
    loaded = FittedHead.load(path)
    assert loaded.inputs_used_ == (True,)
    np.testing.assert_array_equal(loaded.predict_proba([vectors]), head.predict_proba([vectors]))


def test_damaged_or_foreign_head_files_are_one_line(tmp_path):
    vectors, labels = separable()
    path = fitted("probe", vectors, labels).save(tmp_path / "h")
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(UserError, match="version 99; this tool reads vlmf-head version 1"):
        FittedHead.load(path)
    path.write_text(json.dumps(config)[:40])
    with pytest.raises(UserError, match="damaged"):
        FittedHead.load(path)
    path.write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "h.safetensors"))
    del tensors["standardise.0.sd"]
    save_file(tensors, str(tmp_path / "h.safetensors"))
    with pytest.raises(UserError, match="do not fit together"):
        FittedHead.load(path)


def test_features_of_another_encoder_or_weights_are_refused(tmp_path):
    vectors, labels = separable()
    head = FittedHead.load(fitted("probe", vectors, labels).save(tmp_path / "h"))
    head.check_sources([source()], ["same.h5"])  # the head's own kind of features pass
    with pytest.raises(UserError, match="clip-image .* trained on 4-d blip2-qformer.*encoder"):
        head.check_sources([source(encoder="clip-image")], ["clip.h5"])
    with pytest.raises(UserError, match="weights_fingerprint differ"):
        head.check_sources([source(fingerprint="bb" * 32)], ["other.h5"])
    with pytest.raises(UserError, match="features are 5-d; this M1 probe was trained on 4-d"):
        head.predict_proba([torch.zeros(3, 5)])


def test_protocol_heads_reload_in_a_fresh_process_to_the_table(synthetic_cache, tmp_path):
    config = ProtocolConfig(
        manifest=str(synthetic_cache["manifest"]),
        features=(str(synthetic_cache["image"]), str(synthetic_cache["text"])),
        out=str(tmp_path / "p"),
        heads=str(tmp_path / "models"),
        models=("M4", "M1"),
        save_models=("M4", "M1"),
        trials=1,
        epochs=6,
        warmup_epochs=1,
        learning_rate=1e-3,
    )
    run(config)
    table = read_predictions(tmp_path / "p", ("VCD", "GC"))
    val = table[table["split"] == "val"]
    for (model, head, trial), rows in val.groupby(["model", "head", "trial"]):
        # thresholds chosen on each head's own validation rows
        expected = choose_threshold(rows["label"].eq("GC").to_numpy(), rows["prob_GC"].to_numpy())
        assert rows["threshold"].iloc[0] == pytest.approx(expected), (model, head, trial)
    script = (
        "import sys, json\n"
        "from fuse.data import load_cached_rows\n"
        "from fuse.head import FittedHead\n"
        "manifest, features, heads = sys.argv[1], sys.argv[2:4], sys.argv[4:]\n"
        "out = {}\n"
        "for path in heads:\n"
        "    head = FittedHead.load(path)\n"
        "    data = load_cached_rows(manifest, features, head.model.inputs, head.classes)\n"
        "    sites = [s if split == 'external' else None for s, split in "
        "zip(data.table['site'], data.table['split'])]\n"
        "    p = head.predict_proba([data.features[f] for f in head.model.inputs], sites)\n"
        "    out[path] = {'p': p[:, 1].tolist(), 't': head.threshold_}\n"
        "print(json.dumps(out))\n"
    )
    paths = {
        (model, kind): str(head_path(tmp_path / "models", model, kind, 0, 0).with_suffix(".json"))
        for model in ("M4", "M1")
        for kind in ("head", "probe")
    }
    done = subprocess.run(
        [sys.executable, "-c", script, config.manifest, *config.features, *paths.values()],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    for (model, kind), path in paths.items():
        rows = table[(table["model"] == model) & (table["head"] == kind) & (table["trial"] == 0)]
        np.testing.assert_allclose(loaded[path]["p"], rows["prob_GC"], atol=1e-6)
        assert loaded[path]["t"] == pytest.approx(rows["threshold"].iloc[0])


def test_a_saved_head_records_the_precision_it_trained_with(monkeypatch, tmp_path):
    monkeypatch.setattr("fuse.train.cpu_bf16_is_fast", lambda: False)
    vectors, labels = separable()
    head = fitted("head", vectors, labels)
    assert head.settings.precision == "fp32"
    # Loaded on a machine with bf16 units, it still predicts in the precision it trained in.
    monkeypatch.setattr("fuse.train.cpu_bf16_is_fast", lambda: True)
    assert FittedHead.load(head.save(tmp_path / "m1")).settings.precision == "fp32"
