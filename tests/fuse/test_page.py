"""The one-page report, opened in headless Chromium: it renders, every image loads, nothing
is fetched from outside its folder, the headline numbers are tables.json's, tables fit A4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_synthetic_cache
from PIL import Image

from fuse import page, report
from fuse.browser import HeadlessChromium, find_chromium
from fuse.protocol import ProtocolConfig
from fuse.protocol import run as run_protocol
from pipeline.errors import UserError

REPO = Path(__file__).parents[2]
A4_TEXT_WIDTH = 703  # CSS pixels between the page's 12 mm print margins on A4 (186 mm)


@pytest.fixture(scope="module")
def chromium() -> None:
    """Skip where no Chromium is installed, except in CI (CI set), where that is a failure.
    Module-scoped and named first, so that it runs before the slow fixture."""
    if find_chromium() is None:
        message = "no Chromium (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the browser test; .ci/run installs it")
        pytest.skip(message)


def _fake_explain(folder: Path) -> Path:
    """An explain stage's output as the contract with it says: explain.json, overlays, grid."""
    rng = np.random.default_rng(0)
    (folder / "overlays").mkdir(parents=True)
    gallery = []
    for index, reason in enumerate(("most confident right", "most confident wrong")):
        pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "overlays" / f"p{index}.png")
        gallery.append(
            {
                "image": f"overlays/p{index}.png",
                "image_path": f"images/p{index:03d}_0.png",
                "patient_id": f"P{index:03d}",
                "exam_id": "E1",
                "split": "test",
                "label": "GC",
                "predicted": ("GC", "VCD")[index],
                "probability": 0.9 - 0.6 * index,
                "reason": reason,
            }
        )
    Image.fromarray((rng.random((60, 120, 3)) * 255).astype(np.uint8)).save(folder / "grid.png")
    pointing = [
        {
            "set": "test",
            "level": "image",
            "images": 4,
            "pointing_accuracy": 0.75,
            "random_pointing_accuracy": 0.21,
            "mass_inside": 0.4,
            "random_mass_inside": 0.2,
        }
    ]
    explained = {
        "head": "models/M4",
        "encoder": "blip2-qformer",
        "target_class": "GC",
        "gallery": gallery,
        "pointing_game": pointing,
        "notes": ["Random tiny encoders: the pointing game may be near its random baseline."],
    }
    (folder / "explain.json").write_text(json.dumps(explained), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """A small protocol run, its report and a fake explain folder, laid out as dvc.yaml's."""
    root = tmp_path_factory.mktemp("page")
    files = write_synthetic_cache(root, patients=40, images_per_patient=2)
    reports = root / "reports"
    run_protocol(
        ProtocolConfig(
            manifest=str(files["manifest"]),
            features=(str(files["image"]), str(files["text"])),
            out=str(reports / "protocol"),
            models=("M4", "M1"),
            trials=2,
            epochs=3,
            warmup_epochs=1,
            learning_rate=1e-3,
        )
    )
    report.run(
        report.ReportConfig(
            protocol=str(reports / "protocol"), out=str(reports), bootstrap_resamples=20
        )
    )
    return {
        "reports": reports,
        "protocol": reports / "protocol",
        "explain": _fake_explain(reports / "explain"),
    }


def _config(stages: dict[str, Path], **overrides) -> page.PageConfig:
    settings = {
        "report": str(stages["reports"]),
        "protocol": str(stages["protocol"]),
        "explain": str(stages["explain"]),
        "out": str(stages["reports"] / "index.html"),
        **overrides,
    }
    return page.PageConfig(**settings)


def _expected_headline(tables: dict, key: str) -> float:
    """The value a headline key names, looked up in tables.json on its own terms."""
    model, split, level, metric = key.split("/")
    if level == "image":
        records = [r for r in tables["summary"] if r["level"] == "image"]
    else:
        records = [r for r in tables["analyses"]["levels"]["summary"] if r["aggregate"] == "mean"]
    (found,) = [
        r
        for r in records
        if (r["model"], r["head"], r["set"], r["level"], r["metric"])
        == (model, "head", split, level, f"{metric}@0.5")
    ]
    return found["mean"]


def test_the_page_in_chromium(chromium, stages, tmp_path):
    screenshot = tmp_path / "report.png"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuse",
            "page",
            "--report",
            str(stages["reports"]),
            "--protocol",
            str(stages["protocol"]),
            "--explain",
            str(stages["explain"]),
            "--out",
            str(stages["reports"] / "index.html"),
            "--screenshot",
            str(screenshot),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    tables = json.loads((stages["reports"] / "tables.json").read_text(encoding="utf-8"))
    folder = stages["reports"].resolve().as_uri() + "/"
    with HeadlessChromium() as browser:
        browser.open(stages["reports"] / "index.html")
        assert browser.evaluate("document.querySelector('h1').textContent").startswith("VLMF-Net")
        # every request stays in the page's folder (embedded images make none)
        assert browser.requests, "the browser recorded no request at all"
        leaving = [url for url in browser.requests if not url.startswith((folder, "data:"))]
        assert not leaving, leaving
        images = browser.evaluate(
            "[...document.images].map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        figures = sum(len(entry["figures"]) for entry in tables["analyses"].values())
        # two ROC plots, the training curves, every analysis figure, the grid, the gallery
        assert len(images) == 3 + figures + 1 + 2, [alt for alt, _, _ in images]
        assert [alt for alt, complete, width in images if not (complete and width > 0)] == []
        # every analysis of tables.json has its section, its title and its tables
        for name, entry in tables["analyses"].items():
            shown = browser.evaluate(
                f"(s => s && [s.querySelector('h2').textContent, s.querySelectorAll('table')"
                f".length])(document.getElementById('analysis-{name}'))"
            )
            assert shown == [entry["title"], len(entry["shown"])], name
        headlines = browser.evaluate(
            "[...document.querySelectorAll('[data-headline]')]"
            ".map(e => [e.dataset.headline, e.textContent])"
        )
        keys = {key for key, _ in headlines}
        for split in ("test", "external"):
            for level in ("image", "exam", "patient"):
                assert f"M4/{split}/{level}/auc" in keys
        for key, text in headlines:
            assert text == f"{_expected_headline(tables, key):.3f}", key
        # the main tables, read back from tables.json, print as tables.md has them
        shown_table4 = browser.evaluate(
            "(h => { while (!h.querySelector('table')) h = h.nextElementSibling;"
            " return [...h.querySelector('tbody').rows]"
            ".map(r => [...r.cells].map(c => c.textContent)); })"
            "([...document.querySelectorAll('#results h3')]"
            ".find(e => e.textContent.startsWith('Table 4')))"
        )
        markdown = (stages["reports"] / "tables.md").read_text(encoding="utf-8")
        table4 = markdown.split("## Table 4")[1].split("\n## ")[0]
        assert shown_table4 == [
            [cell.strip() for cell in line.strip("|").split("|")]
            for line in table4.splitlines()
            if line.startswith("| M")
        ]
        gallery = browser.evaluate("document.getElementById('explain').innerText")
        assert "most confident wrong" in gallery and "0.750" in gallery  # pointing accuracy
        # laid out for print on A4, no table is wider than the text
        browser.emulate_media("print")
        browser.set_viewport(A4_TEXT_WIDTH, 1000)
        cut = browser.evaluate(
            "[...document.querySelectorAll('table')]"
            f".filter(t => t.getBoundingClientRect().right > {A4_TEXT_WIDTH} + 1)"
            ".map(t => t.caption ? t.caption.textContent : t.rows[0].textContent)"
        )
        assert cut == []
    with Image.open(screenshot) as shot:
        assert shot.size == page.SCREENSHOT_SIZE
        assert len(shot.getcolors(1 << 16) or range(1 << 16)) > 50  # text and tables, not blank


def test_without_the_explain_stage_the_page_says_so(stages, tmp_path):
    for explain in ("", str(tmp_path / "absent")):
        html = page.build_page(_config(stages, explain=explain, out=str(tmp_path / "i.html")))
        assert "The explain stage did not run" in html
        assert "Gallery" not in html and "Pointing game" not in html


def test_damaged_inputs_are_one_user_error(stages, tmp_path):
    broken = tmp_path / "explain"
    broken.mkdir()
    (broken / "explain.json").write_text('{"head": "M4"}', encoding="utf-8")
    with pytest.raises(UserError, match=r"lacks \['encoder', 'target_class', 'gallery'\]"):
        page.build_page(_config(stages, explain=str(broken)))
    old_report = tmp_path / "old-report"
    old_report.mkdir()
    tables = json.loads((stages["reports"] / "tables.json").read_text(encoding="utf-8"))
    for entry in tables["analyses"].values():
        del entry["figures"]
    (old_report / "tables.json").write_text(json.dumps(tables), encoding="utf-8")
    with pytest.raises(UserError, match="written by an older `python -m fuse report`"):
        page.build_page(_config(stages, report=str(old_report)))
    for entry in tables["analyses"].values():
        entry["figures"] = []
    (old_report / "tables.json").write_text(json.dumps(tables), encoding="utf-8")
    with pytest.raises(UserError, match=r"names .*roc_internal.png, which cannot be read"):
        page.build_page(_config(stages, report=str(old_report)))


def test_a_screenshot_without_chromium_is_one_line(stages, tmp_path):
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuse",
            "page",
            "--report",
            str(stages["reports"]),
            "--protocol",
            str(stages["protocol"]),
            "--out",
            str(tmp_path / "index.html"),
            "--screenshot",
            str(tmp_path / "shot.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "CHROMIUM": str(tmp_path / "no-such-browser")},
    )
    assert refused.returncode == 2, refused.stderr
    assert (
        refused.stderr.startswith("error: no Chromium found") and "Traceback" not in refused.stderr
    )
    assert not (tmp_path / "shot.png").exists()
