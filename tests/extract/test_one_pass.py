"""One pass, several outputs: each output equals a run of its encoder alone, each image file
is read once, and encoders of one checkpoint share each forward."""

from __future__ import annotations

import builtins
import io
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from transformers.models.align import modeling_align
from transformers.models.blip_2 import modeling_blip_2
from transformers.models.llama import modeling_llama
from transformers.models.vilt import modeling_vilt

from cache.store import FeatureSet, read_features
from extract import items
from extract.__main__ import main
from extract.provenance import NOT_IDENTITY
from extract.registry import built_in_entry
from extract.run import ExtractConfig, run
from pipeline.errors import UserError
from pipeline.fault_hook import ENVIRONMENT_VARIABLE

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_PASS = ("blip2-qformer", "blip2-vit", "clip-image", "align-image", "chinese-clip-image")
TEXT_PASS = ("llama3", "llama3-last", "clip-text")  # llama3-last: llama3 pooled "last"
PAIR_PASS = ("vilt", "vilt-cls")
BATCH_SIZE = 2  # the small manifest's 4 images: 2 batches


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """Entries that differ from built-in ones only in pooling: one checkpoint each."""
    entries = {
        "llama3-last": {**built_in_entry("llama3"), "pooling": "last"},
        "vilt-cls": {**built_in_entry("vilt"), "pooling": "cls"},
    }
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    return path


def _config(models: Sequence[str], manifest: Path, out: Path, **overrides) -> ExtractConfig:
    settings = {"batch_size": BATCH_SIZE, "num_workers": 0, **overrides}
    return ExtractConfig(model=tuple(models), manifest=str(manifest), out=str(out), **settings)


def _identity(features: FeatureSet) -> dict:
    return {k: v for k, v in features.provenance.items() if k not in NOT_IDENTITY}


def _assert_same_output(features: FeatureSet, alone: FeatureSet) -> None:
    assert features.keys == alone.keys  # the same keys in the same order
    assert np.array_equal(features.vectors, alone.vectors)  # bit for bit
    assert features.sources == alone.sources
    assert features.skipped == alone.skipped
    assert _identity(features) == _identity(alone)  # a run of either is up to date


@pytest.mark.parametrize("models", [IMAGE_PASS, TEXT_PASS, PAIR_PASS], ids=str)
def test_a_pass_writes_what_each_encoder_alone_writes(
    models: tuple[str, ...], small_manifest: Path, registry: Path, tmp_path: Path
) -> None:
    folder = run(_config(models, small_manifest, tmp_path / "pass", registry=str(registry)))
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{m}.h5" for m in models)
    for model in models:
        alone = run(
            _config([model], small_manifest, tmp_path / f"{model}.h5", registry=str(registry))
        )
        features = read_features(folder / f"{model}.h5")
        _assert_same_output(features, read_features(alone))
        assert features.provenance["extract_config"]["model"] == [model]
        assert features.provenance["run"]["pass"] == list(models)


@pytest.fixture
def opened_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How many times each image file under tmp_path/images is opened, by any reader (a
    hash, screening, PIL, a dataset), counted at the one function they all call."""
    images = str(tmp_path / "images")
    opened: Counter = Counter()
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.fspath(file).startswith(images):
            opened[Path(file).name] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    return opened


@pytest.mark.parametrize("budget", [items.HELD_IMAGE_BYTES, 500_000], ids=["decoded", "mixed"])
def test_each_image_file_is_read_once_per_pass(
    budget: int,
    small_manifest: Path,
    tmp_path: Path,
    opened_images: Counter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 500 kB holds one decoded image (400 x 300 RGB: 360 kB), then the other files' bytes.
    monkeypatch.setattr(items, "HELD_IMAGE_BYTES", budget)
    run(_config(IMAGE_PASS, small_manifest, tmp_path / "pass"))
    assert opened_images == {name: 1 for name in ("a.png", "b.png", "c.png", "d.png", "copy.png")}
    if budget < items.HELD_IMAGE_BYTES:
        alone = run(_config(["clip-image"], small_manifest, tmp_path / "alone.h5"))
        in_pass = read_features(tmp_path / "pass" / "clip-image.h5")
        _assert_same_output(in_pass, read_features(alone))


def test_reads_hold_decoded_images_then_bytes_within_the_budget(
    small_table: pd.DataFrame, small_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(items, "HELD_IMAGE_BYTES", 500_000)
    reads = items.read_images(list(small_table["image_path"].unique()), small_manifest)
    first, *others = reads.held.values()
    assert isinstance(first, Image.Image) and first.size == (400, 300)
    assert [type(held) for held in others] == [bytes] * 4


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type) -> list[int]:
    """Count the calls of owner.forward."""
    calls = [0]
    real_forward = owner.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(owner, "forward", counted)
    return calls


def test_encoders_of_one_checkpoint_share_each_forward(
    small_manifest: Path, registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vit = _count_calls(monkeypatch, modeling_blip_2.Blip2VisionModel)
    llama = _count_calls(monkeypatch, modeling_llama.LlamaModel)
    run(_config(("blip2-qformer", "blip2-vit", "clip-image"), small_manifest, tmp_path / "i"))
    assert vit[0] == 2  # 4 images in 2 batches: one ViT forward each, for both outputs
    record = read_features(tmp_path / "i" / "blip2-vit.h5").provenance["run"]
    assert record["forward_shared_with"] == ["blip2-qformer"]

    text = _config(TEXT_PASS, small_manifest, tmp_path / "t", registry=str(registry))
    run(text)
    assert llama[0] == 2  # 3 reports in 2 batches, for llama3 and llama3-last alike


@pytest.mark.parametrize(
    ("entry", "model_class", "tolerance"),
    [
        ("align-image", modeling_align.AlignVisionModel, 0.0),
        # ViLT's seeded patch shuffle draws per forward: equal up to rounding
        ("vilt", modeling_vilt.ViltModel, 1e-5),
    ],
)
def test_a_forward_batch_runs_a_batch_in_chunks_to_the_same_vectors(
    entry: str,
    model_class: type,
    tolerance: float,
    small_manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = tmp_path / "chunked.yaml"
    entries = {
        name: {**built_in_entry(entry), "forward_batch": size}
        for name, size in (("chunked", 1), ("whole", 0))
    }
    registry.write_text(yaml.safe_dump(entries, allow_unicode=True), "utf-8")
    settings = {"registry": str(registry), "batch_size": 8}  # every item in one batch
    forwards = {}
    for name in entries:  # loading may forward once to measure the width: the same for both
        with monkeypatch.context() as patch:
            calls = _count_calls(patch, model_class)
            run(_config([name], small_manifest, tmp_path / f"{name}.h5", **settings))
        forwards[name] = calls[0]
    distinct = 4 if entry == "align-image" else 6  # the small manifest's images / pairs
    assert forwards["chunked"] - forwards["whole"] == distinct - 1
    in_chunks, at_once = (read_features(tmp_path / f"{n}.h5") for n in ("chunked", "whole"))
    assert in_chunks.keys == at_once.keys
    np.testing.assert_allclose(in_chunks.vectors, at_once.vectors, rtol=0, atol=tolerance)
    assert in_chunks.provenance["forward_batch"] == 1
    assert "forward_batch" not in at_once.provenance  # other encoders keep their identity


def test_a_pass_of_several_modalities_is_refused_in_one_line(
    small_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["--model", "blip2-qformer", "llama3", "--manifest", str(small_manifest)]
    with pytest.raises(SystemExit) as exited:
        main([*flags, "--out", str(tmp_path / "pass")])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "mixes modalities (blip2-qformer (image), llama3 (text))" in message
    assert "run a separate pass per modality" in message
    assert not (tmp_path / "pass").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooling": ("mean", "cls", "first")}, "--pooling mean cls first: give one value"),
        ({"weights": ("tiny", "hub", "tiny")}, "--weights tiny hub tiny: give one value"),
        ({"model": ("clip-image", "clip-image")}, "names clip-image more than once"),
    ],
)
def test_per_model_settings_must_match_the_models(
    overrides: dict, message: str, small_manifest: Path, tmp_path: Path
) -> None:
    config = _config(("clip-image", "blip2-vit"), small_manifest, tmp_path / "pass")
    with pytest.raises(UserError, match=message):
        run(ExtractConfig(**{**config.__dict__, **overrides}))


def test_an_output_that_is_up_to_date_is_left_while_the_others_run(
    small_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "pass"
    run(_config(["blip2-qformer"], small_manifest, folder))
    done = (folder / "blip2-qformer.h5").read_bytes()
    capsys.readouterr()
    run(_config(("blip2-qformer", "blip2-vit"), small_manifest, folder))
    assert f"{folder / 'blip2-qformer.h5'} is up to date" in capsys.readouterr().out
    assert (folder / "blip2-qformer.h5").read_bytes() == done
    vit = read_features(folder / "blip2-vit.h5")
    assert vit.provenance["run"]["forward_shared_with"] == []  # alone in the forward
    alone = read_features(run(_config(["blip2-vit"], small_manifest, tmp_path / "vit.h5")))
    _assert_same_output(vit, alone)


def _pass_command(manifest: Path, out: Path, models: Sequence[str]) -> list[str]:
    return [
        "-m", "extract", "--model", *models, "--weights", "tiny", "--device", "cpu",
        "--manifest", str(manifest), "--out", str(out), "--batch-size", "1",
        "--num-workers", "0",
    ]  # fmt: skip


def _python(arguments: list[str], kill_at: str = "") -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), ENVIRONMENT_VARIABLE: kill_at}
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def manifest(small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path]) -> Path:
    """Five rows, four unique images: with batch size 1, four batches."""
    return write_manifest(small_table.iloc[:5])


PAIR_OF_IMAGE_ENCODERS = ("blip2-qformer", "blip2-vit")


def test_a_killed_pass_resumes_each_output_from_its_own_parts(
    manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pass"
    # Parts are written output by output per batch: the 4th, killed before it is renamed,
    # is blip2-vit's of batch 2.
    killed = _python(_pass_command(manifest, out, PAIR_OF_IMAGE_ENCODERS), kill_at="part-write:4")
    assert killed.returncode == -signal.SIGKILL
    assert [len(list((out / f"{m}.h5.parts").glob("*.h5"))) for m in PAIR_OF_IMAGE_ENCODERS] == [
        2,
        1,
    ]
    rerun = _python(_pass_command(manifest, out, PAIR_OF_IMAGE_ENCODERS))
    assert rerun.returncode == 0, rerun.stderr
    for model, resumed in zip(PAIR_OF_IMAGE_ENCODERS, (2, 1), strict=True):
        features = read_features(out / f"{model}.h5")
        assert features.provenance["run"]["reused_from_parts"] == resumed
        assert features.provenance["run"]["encoded"] == 4 - resumed
        alone = _config([model], manifest, tmp_path / f"{model}.h5", batch_size=1)
        _assert_same_output(features, read_features(run(alone)))
    assert sorted(path.name for path in out.iterdir()) == ["blip2-qformer.h5", "blip2-vit.h5"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_share_a_pass_and_write_every_output(manifest: Path, tmp_path: Path) -> None:
    models = ("blip2-qformer", "blip2-vit", "clip-image")
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    out = tmp_path / "two"
    finished = _python([*launch, *_pass_command(manifest, out, models)])
    assert finished.returncode == 0, finished.stderr
    one = run(_config(models, manifest, tmp_path / "one", batch_size=1))
    for model in models:
        features = read_features(out / f"{model}.h5")
        assert features.provenance["run"]["encoded_per_process"] == [2, 2]
        _assert_same_output(features, read_features(one / f"{model}.h5"))


def test_reading_threads_give_the_reads_of_one_thread(
    small_table: pd.DataFrame, small_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = list(small_table["image_path"].unique())
    inline = items.read_images(paths, small_manifest)
    monkeypatch.setattr(items, "INLINE_READS", 0)  # so few files would be read inline
    in_workers = items.read_images(paths, small_manifest, threads=2)
    assert in_workers.checks == inline.checks
    assert in_workers.held == inline.held
    assert len(inline.held) == 5 and all(inline.checks[path].key for path in paths)
