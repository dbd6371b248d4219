"""Every command, as a user calls it: --help works, and bad input is one line, never a
traceback.

To cover a new command, add it to COMMANDS (how to call its main in-process) and HELP
(its `python -m` words); its bad inputs are rows of BAD_INPUTS: the command, its
arguments (with {placeholders} of the `inputs` fixture) and a fragment of the one
`error:` line expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pytest

import extract.__main__
import extract.explain
import extract.predict
import fuse.__main__
import pipeline.demo.__main__
from cache.store import FeatureSet, write_features
from fuse.schema import PREDICTIONS_FILE, RUN_SECTIONS, RUNS_FILE, prediction_rows
from pipeline.demo import generate as demo
from pipeline.keys import text_key

COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "extract": extract.__main__.main,
    "fuse": lambda argv: fuse.__main__.main(list(argv)),
    "pipeline.demo": pipeline.demo.__main__.main,
    "extract.predict": extract.predict.main,
    "extract.explain": extract.explain.main,
}
HELP = (  # the words after `python -m`
    ("extract",),
    ("fuse", "protocol"),
    ("fuse", "report"),
    ("fuse", "page"),
    ("fuse", "predict"),
    ("pipeline.demo",),
    ("extract.predict",),
    ("extract.explain",),
)

_EXTRACT = ("--model", "llama3", "--manifest", "{manifest}", "--out", "{out}/text.h5")
_PROTOCOL = (
    *("protocol", "--manifest", "{manifest}", "--features", "{features}"),
    *("--out", "{out}/protocol", "--trials", "1"),
)
_CLINICAL = ("--models", "M4-clinical", "--clinical-numeric", "age")
_REPORT = ("report", "--protocol", "{out}", "--out", "{out}/report")
_PREDICT = (
    *("predict", "--head", "{out}/none.json", "--manifest", "{manifest}"),
    *("--features", "{features}"),
)
_EXAM = ("--head", "{out}/none.json", "--images", "{manifest}", "--report-file", "{manifest}")
_EXPLAIN = (
    *("--head", "{out}/none.json", "--manifest", "{manifest}", "--features", "{features}"),
    *("--out", "{out}/explain"),
)

BAD_INPUTS = [
    # extract: settings, paths, manifests, items, outputs
    ("extract", (*_EXTRACT, "--batch-size", "0"), "--batch-size is 0; it must be at least 1"),
    ("extract", (*_EXTRACT, "--batch-size", "-4"), "--batch-size is -4; it must be at least 1"),
    ("extract", (*_EXTRACT, "--num-workers", "-1"), "--num-workers is -1; it must be at least 0"),
    ("extract", (*_EXTRACT, "--wait-for-lock", "-1"), "--wait-for-lock is -1"),
    ("extract", (*_EXTRACT[:2], "clip-text", *_EXTRACT[2:]), "names one feature file, but 2"),
    ("extract", (*_EXTRACT[:3], "{out}", *_EXTRACT[4:]), "is a folder; give the manifest file"),
    ("extract", (*_EXTRACT[:3], "{bad_label}", *_EXTRACT[4:]), "label 'GC ' not among"),
    ("extract", (*_EXTRACT[:3], "{repeated_header}", *_EXTRACT[4:]), "appear more than once"),
    ("extract", (*_EXTRACT[:3], "{bad_byte}", *_EXTRACT[4:]), "is UTF-8 except for 1 byte"),
    ("extract", (*_EXTRACT[:3], "{bad_reports}", *_EXTRACT[4:]), "nothing to encode"),
    ("extract", (*_EXTRACT[:5], "{image_features}"), "pass --overwrite true to replace it"),
    ("extract", (*_EXTRACT, "--strict", "maybe"), "expected true or false"),
    # fuse protocol: settings and inputs
    ("fuse", (*_PROTOCOL, "--epochs", "0"), "--epochs is 0; it must be at least 1"),
    (
        "fuse",
        (*_PROTOCOL, "--warmup-epochs", "5", "--epochs", "3"),
        "give more epochs than warm-up epochs",
    ),
    ("fuse", (*_PROTOCOL, "--classes", "VCD", "GC", "SCC"), "it must be exactly 2"),
    ("fuse", (*_PROTOCOL, "--batch-size", "0"), "--batch-size is 0; it must be at least 1"),
    ("fuse", (*_PROTOCOL, "--modality-dropout", "1"), "give a probability below 1"),
    ("fuse", (*_PROTOCOL, "--label-fractions", "0", "1"), "give a share of patients in (0, 1]"),
    ("fuse", (*_PROTOCOL, "--split", "random"), "--split is 'random'; it must be one of"),
    ("fuse", (*_PROTOCOL, "--selection", "auc"), "--selection is 'auc'; it must be one of"),
    ("fuse", (*_PROTOCOL, "--trials", "0"), "--trials is 0; it must be at least 1"),
    ("fuse", (*_PROTOCOL[:4], "{no_features}", *_PROTOCOL[5:]), "holds no *.h5 file; extract"),
    ("fuse", (*_PROTOCOL[:4], "{cut_features}", *_PROTOCOL[5:]), "re-run extraction"),
    ("fuse", (*_PROTOCOL, "--models", "M4-clinical"), "take clinical variables, but none are"),
    ("fuse", (*_PROTOCOL, "--clinical-missing", "drop"), "--clinical-missing is 'drop'"),
    (
        "fuse",
        (*_PROTOCOL[:2], "{bad_age}", *_PROTOCOL[3:], *_CLINICAL),
        "column 'age': not a number ('sixty') at line(s) 2;",
    ),
    (
        "fuse",
        (*_PROTOCOL, *_CLINICAL[:3], "weight"),
        "clinical column(s) 'weight' missing (declared by",
    ),
    # fuse report
    ("fuse", (*_REPORT, "--bootstrap-resamples", "0"), "--bootstrap-resamples is 0"),
    ("fuse", ("report", "--protocol", "{out}/none", "--out", "{out}/r"), "does not exist"),
    ("fuse", _REPORT[:2] + ("{cut_protocol}",) + _REPORT[3:], "predictions.parquet"),
    ("fuse", _REPORT[:2] + ("{empty_runs}",) + _REPORT[3:], "runs.json"),
    # fuse predict and extract.predict
    ("fuse", (*_PREDICT, "--operating-point", "best"), "--operating-point is 'best'"),
    ("fuse", (*_PREDICT, "--centring", "site"), "--centring is 'site'"),
    ("fuse", _PREDICT, "none.json does not exist: a saved head is a pair"),
    ("fuse", ("predict", "--head", "{out}", *_PREDICT[3:]), "holds no saved head"),
    ("extract.predict", (*_EXAM, "--report", "x"), "give the report once"),
    ("extract.predict", (*_EXAM[:3], "{out}/none.png", *_EXAM[4:]), "image file(s) not found"),
    ("extract.predict", (*_EXAM, "--centring", "batch"), "--centring is 'batch'"),
    # extract.explain
    ("extract.explain", _EXPLAIN, "none.json does not exist: a saved head is a pair"),
    ("extract.explain", ("--head", "{out}", *_EXPLAIN[2:]), "holds no saved head"),
    (
        "extract.explain",
        (*_EXPLAIN, "--sets", "train"),
        "--sets is train; it must be one of test, external",
    ),
    ("extract.explain", (*_EXPLAIN, "--batch-size", "0"), "--batch-size is 0"),
    ("extract.explain", (*_EXPLAIN, "--random", "-1"), "--random is -1; it must be at least 0"),
    # the demo generator
    ("pipeline.demo", ("--out", "{out}/demo", "--patients", "1"), "it must be at least 2"),
    ("pipeline.demo", ("--out", "{bad_label}"), "is a file; give a folder"),
    ("pipeline.demo", ("--out", "{out}"), "which this command did not write"),
]


def _test_id(row) -> str:
    command, _, expected = row.values if hasattr(row, "values") else row
    return f"{command}: {expected}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny demo, manifests each wrong in one way, feature files and protocol folders."""
    folder = tmp_path_factory.mktemp("cli")
    manifest = demo.run(
        demo.DemoConfig(
            out=str(folder / "demo"), patients=4, external_patients=0, images_per_report=1
        )
    )
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    written = {"manifest": manifest, "out": folder / "out"}
    written["out"].mkdir()
    (written["out"] / "someone-else's.txt").write_text("keep me")
    written["no_features"] = folder / "no_features"  # a feature folder without a file
    (written["no_features"] / "text.h5.parts").mkdir(parents=True)

    def manifest_like(name: str, changed: pd.DataFrame) -> None:
        written[name] = manifest.with_name(f"{name}.csv")
        changed.to_csv(written[name], index=False)

    manifest_like("bad_label", table.assign(label=["GC "] + list(table["label"][1:])))
    manifest_like("bad_reports", table.assign(report_text="声门\x07下"))
    manifest_like("bad_age", table.assign(age=["sixty"] + list(table["age"][1:])))
    written["repeated_header"] = manifest.with_name("repeated_header.csv")
    written["repeated_header"].write_text(
        "image_path,report_text,label,patient_id,label\nimages/a.png,x,GC,1,GC\n"
    )
    written["bad_byte"] = manifest.with_name("bad_byte.csv")
    written["bad_byte"].write_bytes(manifest.read_bytes().rstrip(b"\n") + b"\xff\n")

    reports = list(dict.fromkeys(table["report_text"]))
    written["features"] = write_features(
        folder / "text.h5",
        FeatureSet(
            keys=tuple(text_key(report) for report in reports),
            vectors=np.ones((len(reports), 4), np.float32),
            provenance={"encoder": "llama3", "modality": "text", "pooling": "mean"},
        ),
    )
    written["image_features"] = write_features(
        folder / "image.h5",
        FeatureSet(
            keys=("k",),
            vectors=np.ones((1, 4), np.float32),
            provenance={"encoder": "blip2-qformer", "modality": "image"},
            sources={"images/x.png": "k"},
        ),
    )
    written["cut_features"] = folder / "cut.h5"
    written["cut_features"].write_bytes(written["features"].read_bytes()[:1000])
    # A whole predictions table beside an empty runs.json, and a cut one beside a whole runs.json
    predictions = prediction_rows(
        table.assign(exam_id="e", site="s"),
        ["test"] * len(table),
        model="M4",
        head="head",
        trial=0,
        fold=0,
        threshold=0.5,
        probabilities=np.full((len(table), 2), 0.5),
        classes=("VCD", "GC"),
    )
    whole_runs = {section: {} for section in RUN_SECTIONS}
    whole_runs.update(settings={"classes": ["VCD", "GC"]}, runs=[{"model": "M4", "trial": 0}])
    for name, cut in (("cut_protocol", True), ("empty_runs", False)):
        written[name] = folder / name
        written[name].mkdir()
        predictions.to_parquet(written[name] / PREDICTIONS_FILE, index=False)
        (written[name] / RUNS_FILE).write_text(json.dumps(whole_runs) if cut else "")
        if cut:
            whole = (written[name] / PREDICTIONS_FILE).read_bytes()
            (written[name] / PREDICTIONS_FILE).write_bytes(whole[: len(whole) // 2])
    return {name: str(path) for name, path in written.items()}


@pytest.mark.parametrize(
    ("command", "argv", "expected"), BAD_INPUTS, ids=[_test_id(row) for row in BAD_INPUTS]
)
def test_bad_input_is_one_error_line_and_exit_code_2(
    inputs: dict[str, str],
    capsys: pytest.CaptureFixture,
    command: str,
    argv: tuple[str, ...],
    expected: str,
) -> None:
    arguments = [word.format(**inputs) for word in argv]
    try:
        COMMANDS[command](arguments)
    except SystemExit as exited:
        code = exited.code
    except Exception as error:  # what a user would see as a traceback
        pytest.fail(f"traceback: {type(error).__name__}: {error}")
    else:
        code = 0
    err = capsys.readouterr().err
    # ours start with "error:"; argparse's (a flag it cannot parse) with "python -m ...: error:"
    errors = [line for line in err.splitlines() if re.match(r"(python -m [\w. ]+: )?error: ", line)]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1 and expected in errors[0], err


@pytest.mark.parametrize("words", HELP, ids=" ".join)
def test_every_command_s_help_exits_0(words: tuple[str, ...], capsys) -> None:
    command, *subcommand = words
    with pytest.raises(SystemExit) as exited:
        COMMANDS[command]([*subcommand, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {' '.join(words)} ")
