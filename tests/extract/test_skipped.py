"""Bad items are skipped, recorded with their reasons and summarised; --strict refuses them
before any encoder loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from huggingface_hub import constants as hub_constants

from cache.store import read_features
from extract.__main__ import main
from extract.registry import get_spec
from extract.run import ExtractConfig, run
from pipeline.errors import UserError
from pipeline.keys import file_key, normalise_text, text_key

BAD_IMAGES = {
    "images/empty.png": "zero-byte",
    "images/notes.png": "not an image",
    "images/absent.png": "missing",
}


@pytest.fixture
def manifest(
    small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path], tmp_path: Path
) -> Path:
    """The small manifest plus a zero-byte image, a text file named .png, an image file
    that does not exist, and a report holding a control character."""
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "notes.png").write_text("not a picture", encoding="utf-8")
    bad_rows = pd.DataFrame(
        {
            "image_path": [*BAD_IMAGES, "images/c.png"],
            "report_text": ["声带光滑。", "声带充血。", "声带水肿。", "声门下\x07可见新生物。"],
            "label": ["VCD", "GC", "VCD", "GC"],
            "patient_id": ["p4", "p5", "p7", "p3"],
        }
    )
    return write_manifest(pd.concat([small_table.iloc[:5], bad_rows], ignore_index=True))


def _config(model: str, manifest: Path, out: Path, **overrides) -> ExtractConfig:
    return ExtractConfig(
        model=model, manifest=str(manifest), out=str(out), num_workers=0, **overrides
    )


def test_bad_images_are_skipped_recorded_and_summarised(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = _config("blip2-qformer", manifest, tmp_path / "image.h5")
    features = read_features(run(config))
    assert features.skipped == BAD_IMAGES
    assert len(features.keys) == 4  # a, b, c, d: the run went on
    assert set(features.sources) == {f"images/{name}.png" for name in "abcd"}
    assert features.provenance["run"]["skipped"] == 3
    warning = capsys.readouterr().err
    assert "warning: skipped 3 bad item(s) (zero-byte: 1, not an image: 1, missing: 1)" in warning
    assert "first: images/empty.png (zero-byte); images/notes.png (not an image)" in warning
    run(config)  # up to date: the summary is repeated, the file not rewritten
    assert "warning: skipped 3 bad item(s)" in capsys.readouterr().err


def test_pairs_with_a_bad_half_are_skipped(manifest: Path, tmp_path: Path) -> None:
    features = read_features(run(_config("vilt", manifest, tmp_path / "pairs.h5")))
    bad_report = "声门下\x07可见新生物。"
    assert features.skipped == {
        **BAD_IMAGES,
        f"{text_key(bad_report)} {normalise_text(bad_report)}".replace("\x07", "\\x07"): (
            "control characters"
        ),
    }
    assert len(features.keys) == 5  # the five good rows, each a distinct pair


def test_bad_reports_are_skipped_by_text_encoders(manifest: Path, tmp_path: Path) -> None:
    features = read_features(run(_config("llama3", manifest, tmp_path / "text.h5")))
    assert list(features.skipped.values()) == ["control characters"]
    assert text_key("声门下\x07可见新生物。") not in features.keys
    assert text_key("声带光滑。") in features.keys  # its image is bad, not its report
    assert file_key(manifest) == features.provenance["manifest"]["sha256"]


@pytest.mark.parametrize(
    ("keep_missing_file", "expected"),
    [
        (True, "column 'image_path': image file not found"),  # the manifest check
        (False, "error: --strict: 2 bad item(s) (zero-byte: 1, not an image: 1); first: "),
    ],
)
def test_strict_refuses_bad_items_before_any_encoder_loads(
    keep_missing_file: bool,
    expected: str,
    manifest: Path,
    write_manifest: Callable[[pd.DataFrame], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    if not keep_missing_file:
        table = pd.read_csv(manifest)
        manifest = write_manifest(table[table["image_path"] != "images/absent.png"])
    # With --weights hub and an empty cache, loading the encoder would fail: getting the
    # --strict error instead proves the items are checked first.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    flags = ["--model", "blip2-qformer", "--weights", "hub", "--strict", "true"]
    with pytest.raises(SystemExit) as exited:
        main([*flags, "--manifest", str(manifest), "--out", str(tmp_path / "image.h5")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.splitlines()[-1]  # after the images' progress bar
    assert expected in message
    assert get_spec("blip2-qformer").source not in message
    assert not (tmp_path / "image.h5").exists()


def test_empty_reports_are_skipped_or_refused_with_strict(
    small_table: pd.DataFrame,
    write_manifest: Callable[[pd.DataFrame], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    table = small_table.copy()
    table.loc[[1, 4], "report_text"] = ""
    table.loc[[2, 5], "report_text"] = " \u3000\n"
    manifest = write_manifest(table)

    features = read_features(run(_config("llama3", manifest, tmp_path / "text.h5")))

    # Both normalise to the same empty text: one item, recorded once.
    assert list(features.skipped.values()) in (["empty"], ["whitespace-only"])
    assert features.keys == (text_key(table["report_text"][0]),)  # the one report left
    with pytest.raises(SystemExit) as exited:
        main(["--model", "llama3", "--strict", "true", "--manifest", str(manifest),
              "--out", str(tmp_path / "strict.h5")])  # fmt: skip
    assert exited.value.code == 2
    assert "column 'report_text': empty value at line(s) 3, 4" in capsys.readouterr().err


def test_a_report_with_a_nul_byte_is_recorded_escaped(manifest: Path, tmp_path: Path) -> None:
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table.loc[len(table)] = ["images/c.png", "声带\x00白斑", "GC", "p3"]
    table.to_csv(manifest, index=False)
    features = read_features(run(_config("llama3", manifest, tmp_path / "text.h5")))
    nul = text_key("声带\x00白斑") + " 声带\\x00白斑"
    assert features.skipped[nul] == "control characters"
    assert len(features.skipped) == 2


def test_a_manifest_of_only_bad_reports_is_one_line(
    small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path], tmp_path: Path
) -> None:
    table = small_table.assign(report_text="声门\x07下")
    with pytest.raises(UserError, match="nothing to encode, every text item is bad: 1 bad item"):
        run(_config("llama3", write_manifest(table), tmp_path / "text.h5"))


def test_unreadable_images_and_symlink_loops_are_skipped_with_their_reason(
    small_table: pd.DataFrame,
    write_manifest: Callable[[pd.DataFrame], Path],
    tmp_path: Path,
    deny_reading: Callable[[Path], None],
) -> None:
    loop = tmp_path / "images" / "loop.png"
    loop.symlink_to(loop)
    deny_reading(tmp_path / "images" / "b.png")
    rows = pd.DataFrame(
        {"image_path": ["images/loop.png"], "report_text": ["x"], "label": ["GC"]}
    ).assign(patient_id="p9")
    manifest = write_manifest(pd.concat([small_table.iloc[:3], rows], ignore_index=True))
    features = read_features(run(_config("blip2-qformer", manifest, tmp_path / "image.h5")))
    assert features.skipped == {"images/b.png": "unreadable", "images/loop.png": "symlink loop"}
