"""`python -m extract.predict`: one exam's images and report to a decision, in one command.

It runs the encoders a saved head was trained on (read from the head's provenance: the
encoder, pooling, dtype and registry extraction recorded; `--weights` as in extract),
exactly as `python -m extract` would on a one-exam manifest, and then the head through
`fuse.predict`. It is the one step that needs both extract and fuse; what it knows about
heads lives in fuse.head, about encoders in extract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from extract.run import ExtractConfig
from extract.run import run as extract_run
from fuse.head import CENTRING, FeatureSource
from fuse.predict import DecisionSettings, PredictConfig, describe_heads, load_heads
from fuse.predict import run as predict_run
from pipeline.cli import stage_main
from pipeline.config import require_paths, setting
from pipeline.errors import UserError

DESCRIPTION = """\
Diagnose one examination: encode its images and its report with the encoders the saved
head (or ensemble) was trained on, then apply the head. Prints the class probabilities and
the decision per image and for the exam, at the operating point the head chose on its
validation patients, and which head decided (--json true for machines). The encoders,
pooling and dtype come from the head's provenance; --weights says where the weights are on
this machine (as in python -m extract), and the weights must be the ones the head was
trained on (their fingerprint is checked)."""

EXAMPLES = """\
  python -m extract.predict --head models/M4 --images exam/1.png exam/2.png \\
      --report-file exam/report.txt
  python -m extract.predict --head models/M4/trial0-fold0-head.json --images a.png \\
      --report "左声带前中段见新生物..." --weights blip2-qformer=/models/blip2-opt-2.7b \\
      llama3=/models/llama-3-chinese-8b --json true
"""


@dataclass(frozen=True)
class ExamConfig(DecisionSettings):
    """One exam, the head that decides, and where the encoders' weights are."""

    images: tuple[str, ...] = setting((), "the exam's image files")
    report: str = setting("", "the exam's report text")
    report_file: str = setting("", "a UTF-8 file holding the report (instead of --report)")
    patient_id: str = setting("?", "the patient's id, only echoed in the output")
    exam_id: str = setting("?", "the exam's id, only echoed in the output")
    site: str = setting(
        "", "the exam's site: an external site the protocol saw gets its stored centring"
    )
    weights: tuple[str, ...] = setting(
        (),
        "where the encoders' weights are: one value for every encoder (tiny, hub or a "
        "FOLDER) or ENCODER=VALUE per encoder; empty: what extraction recorded",
    )
    centring: str = setting(
        "stored",
        "a batch of one exam cannot centre itself, so: stored: "
        + CENTRING["stored"]
        + "; none: every row as it is",
        choices=("stored", "none"),
    )
    device: str = setting("auto", "where the encoders run: auto, cpu, cuda or cuda:N")


def _report(config: ExamConfig) -> str:
    if bool(config.report) == bool(config.report_file):
        raise UserError("give the report once: --report TEXT or --report-file FILE")
    if config.report:
        return config.report
    try:
        return Path(config.report_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--report-file {config.report_file}: {error}") from None


def weights_of(entries: Sequence[str], encoders: Sequence[str]) -> dict[str, str]:
    """Each encoder's --weights value (`entries`: VALUE for all, or ENCODER=VALUE each), or
    "" for what extraction recorded."""
    given: dict[str, str] = {}
    for entry in entries:
        encoder, separator, value = entry.partition("=")
        if not separator:
            given.update(dict.fromkeys(encoders, entry))
        elif encoder not in encoders:
            raise UserError(
                f"--weights {entry}: {encoder} is not an encoder of this head "
                f"({', '.join(encoders)})"
            )
        else:
            given[encoder] = value
    return {encoder: given.get(encoder, "") for encoder in encoders}


def _extract_config(
    source: FeatureSource, weights: str, manifest: Path, out: Path, device: str
) -> ExtractConfig:
    """Extraction as recorded for `source`, on the exam's manifest."""
    recorded: Mapping[str, Any] = source.extract_config
    known = {field.name for field in dataclasses.fields(ExtractConfig)}
    settings = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in recorded.items()
        if name in known
    }
    if not settings:
        raise UserError(
            f"the head's {source.encoder} features record no extraction settings; extract "
            "the exam with python -m extract and use python -m fuse predict"
        )
    return ExtractConfig(
        **{
            **settings,
            "model": source.encoder,
            "weights": weights or settings.get("weights", "tiny"),
            "manifest": str(manifest),
            "out": str(out),
            "device": device,
            "image_root": "/",
            "num_workers": 0,  # one exam: decoding inline is faster than starting workers
            "wait_for_lock": 0,
            "strict": True,  # a bad image of the exam is an error, not a skipped row
            "labels_per_exam": False,
        }
    )


def run(config: ExamConfig) -> dict[str, Any]:
    """Encode the exam with the head's encoders and apply the head."""
    require_paths(config, "head", "images")
    report = _report(config)
    missing = [image for image in config.images if not Path(image).is_file()]
    if missing:
        raise UserError(f"image file(s) not found: {', '.join(missing)}")
    heads = load_heads(config.head, config.kind)
    if heads[0].clinical is not None:
        raise UserError(
            f"{describe_heads(heads)} also takes the clinical columns "
            f"{', '.join(heads[0].clinical.columns)}, which image files and a report do not "
            "give: put the exam in a manifest with them and use python -m fuse predict"
        )
    sources = {source.encoder: source for head in heads for source in head.sources_}
    weights = weights_of(config.weights, list(sources))
    with tempfile.TemporaryDirectory(prefix="vlmf-exam-") as folder:
        manifest = Path(folder) / "manifest.csv"
        pd.DataFrame(
            {
                "image_path": [os.path.abspath(image) for image in config.images],
                "report_text": report,
                "label": "",
                "patient_id": config.patient_id,
                "exam_id": config.exam_id,
                "split": "external" if config.site else "",
                "site": config.site,
            }
        ).to_csv(manifest, index=False)
        features = []
        for encoder, source in sources.items():
            out = Path(folder) / f"{encoder}.h5"
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the result (--json)
                extract_run(_extract_config(source, weights[encoder], manifest, out, config.device))
            features.append(str(out))
        result = predict_run(
            PredictConfig(
                head=config.head,
                manifest=str(manifest),
                features=tuple(features),
                kind=config.kind,
                operating_point=config.operating_point,
                centring=config.centring,
                json=config.json,
                image_root="/",
            )
        )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags and diagnose the exam."""
    stage_main(
        ExamConfig,
        run,
        prog="python -m extract.predict",
        section="predict",
        description=DESCRIPTION,
        examples=EXAMPLES,
        argv=argv,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
