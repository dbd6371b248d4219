"""`python -m fuse protocol | report | page | predict`: train heads on cached features, report
on them, put it all on one HTML page, and apply saved heads to new exams."""

import sys

from fuse import page, predict, protocol, report
from pipeline.cli import stage_main

PROTOCOL_DESCRIPTION = """\
Run the paper's evaluation on cached encoder features: for every model (M4 = VLMF-Net:
image projector -> 512, report projector -> 2048, L2-normalise, concatenate, MLP, loss =
cross-entropy + 0.1 x NT-Xent; ablations M1-M3; frozen-feature baselines) and every trial
(or fold), train a head and a logistic-regression probe on the training patients, select
on the validation patients, and predict every pair. Writes predictions.parquet (one row per
pair, model, head, trial, fold), runs.json (settings, seeds, learning rates, kept epochs,
thresholds, data identity) and training_curves.csv. Needs the manifest and the feature
files, not the images or the encoders. Settings: defaults < --params section < flags."""

PROTOCOL_EXAMPLES = """\
  python -m fuse protocol --manifest data/demo/manifest.csv \\
      --features features/*.h5 --out reports/protocol --heads models
  python -m fuse protocol --params params.yaml --manifest ... --features ... --out ... \\
      --models M4 M1 M2 --trials 3 --split kfold --folds 5 --learning-rates 1e-5 1e-4 1e-3
"""

REPORT_DESCRIPTION = """\
From a protocol's predictions table alone (it trains nothing): the paper's Tables 2-4 at
image level (mean (SD) over trials, patient-bootstrap 95 percent CIs, a paired-trials p on
the same per-trial AUCs), ROC plots per set, training curves, and every analysis of
fuse/analyses: the metrics at image, exam and patient level; M4 against each model per
level (both AUCs, their difference with a paired patient-bootstrap CI, the p-value of that
level, and where levels change the order); calibration (ECE, reliability diagrams, before
and after recalibration fitted on validation); operating points for a target sensitivity
and specificity chosen on validation; decision curves; heads whose kept epoch was decided
by the warm-up. Writes tables.md, tables.json, analyses/*.csv, plots/*.png, metrics/."""

REPORT_EXAMPLES = """\
  python -m fuse report --protocol reports/protocol --out reports
"""

PAGE_DESCRIPTION = """\
Put everything the pipeline found on one static HTML page: the headline numbers, the data
set (patients, exams, pairs, sites and classes per split; pairs left out and why), the
report's tables and ROC curves, every analysis of tables.json with its figures, the explain
stage's heatmaps and pointing game when it ran, and provenance (encoders, weights
fingerprints, settings, git revision, package versions). It computes nothing new. Figures
are embedded, nothing is loaded from outside; it prints on A4. --screenshot also writes a
PNG of it through headless Chromium."""

PAGE_EXAMPLES = """\
  python -m fuse page --report reports --protocol reports/protocol \\
      --explain reports/explain --out reports/index.html
  python -m fuse page ... --screenshot docs/report.png
"""

PREDICT_DESCRIPTION = """\
Apply saved heads to new exams: score every image-report pair of a manifest whose features
were extracted with the heads' encoders (python -m extract, same encoder, weights and
pooling: other features are refused), decide at an operating point chosen on the heads'
validation patients, and aggregate per exam. A folder of heads (models/M4: every trial's
head) is an ensemble: probabilities and thresholds are averaged. Labels are optional and
only echoed. To go from image files and a report to a decision in one step, use
`python -m extract.predict`, which runs the encoders first."""

PREDICT_EXAMPLES = """\
  python -m fuse predict --head models/M4 --manifest new/manifest.csv \\
      --features new/image.h5 new/text.h5 --out new/predictions.csv
  python -m fuse predict --head models/M4/trial0-fold0-head.json --manifest ... \\
      --features ... --operating-point sensitivity --centring batch --json true
"""

COMMANDS = {
    "protocol": (protocol.ProtocolConfig, protocol.run, PROTOCOL_DESCRIPTION, PROTOCOL_EXAMPLES),
    "report": (report.ReportConfig, report.run, REPORT_DESCRIPTION, REPORT_EXAMPLES),
    "page": (page.PageConfig, page.run, PAGE_DESCRIPTION, PAGE_EXAMPLES),
    "predict": (predict.PredictConfig, predict.run, PREDICT_DESCRIPTION, PREDICT_EXAMPLES),
}


def main(argv: list[str]) -> None:
    """Dispatch to a subcommand; without one, say which exist."""
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: python -m fuse {protocol,report,page,predict} [--help] ...\n"
            "  protocol  train every model and trial on cached features -> predictions table\n"
            "  report    tables, ROC plots and training curves from that table\n"
            "  page      everything on one HTML page (reports/index.html)\n"
            "  predict   apply saved heads to the cached features of new exams",
            file=sys.stderr,
        )
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    config_cls, run, description, examples = COMMANDS[argv[0]]
    stage_main(
        config_cls,
        run,
        prog=f"python -m fuse {argv[0]}",
        section="fuse" if argv[0] == "protocol" else f"fuse_{argv[0]}",
        description=description,
        examples=examples,
        argv=argv[1:],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
