"""How long does the first `dvc repro` of a fresh clone take, stage by stage?

The repository's tracked files (`git ls-files`, less `.dvc/` and `dvc.lock`) are copied
into a new temporary folder, which is what a fresh clone holds; there `dvc init --no-scm`
and `dvc repro` run, with dvc's output streamed here and each "Running stage" line
timestamped. A stage's seconds run from its line to the next one's (or to the end of the
run): its command, then DVC's hashing and caching of its outputs. Prints one line per
stage; from each protocol run's runs.json (reports/protocol, reports/label_efficiency),
what each model's fits cost (heads and probes apart, fits reused from another run apart);
the total, the CPU model and its thread count, and writes
bench/results/dvc_repro.json (not in --smoke mode; with --set, a file named by the
settings, dvc_repro_set_fuse.trials-3.json, which also records them). The stages run
with this Python and this dvc unless --install is given.

    python bench/dvc_repro.py            # the demo as dvc.yaml and params.yaml define it
    python bench/dvc_repro.py --install  # first time the README's install in a new venv
    python bench/dvc_repro.py --smoke    # seconds: `dvc repro demo` on a tiny demo (tests)
    python bench/dvc_repro.py --set demo.images_per_report=7 --set fuse.trials=3
                                         # another workload: params.yaml changed in the copy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name, cpu_threads  # noqa: E402
from fuse.reuse import REUSED_FROM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "dvc_repro.json"
NOT_COPIED = (".dvc/", "dvc.lock")  # `dvc init` makes the first; the run writes the second
SMOKE_PARAMS = {"demo.patients": 8, "demo.external_patients": 2, "demo.images_per_report": 3}
SMOKE_TARGETS = ("demo",)
# The README's Quickstart: CPU torch first, so that pip does not pull a CUDA build.
INSTALL_STEPS = (
    ("torch", ("-m", "pip", "install", "-q", "torch==2.13.0")),
    ("vlmf", ("-m", "pip", "install", "-q", "-e", ".[extract,dev]")),
)
RUNNING = re.compile(r"Running stage '([^']+)'")
RUNS_FILES = "reports/*/runs.json"  # one per protocol run: fuse, label_efficiency
# run folder -> model -> kind of fit (head, probe) -> {"fits", "seconds", "reused"}
FitSummary = dict[str, dict[str, dict[str, dict[str, float]]]]


def tracked_files(repo: Path) -> list[str]:
    """The repository's tracked files that a fresh clone has, as paths relative to it."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [
        name
        for name in listed
        if name and not name.startswith(NOT_COPIED) and (repo / name).is_file()
    ]


def copy_project(repo: Path, destination: Path) -> None:
    """Copy the repository's tracked files (as they are on disk) into `destination`."""
    for name in tracked_files(repo):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)


@dataclass(frozen=True)
class StreamedRun:
    """A command's exit code, its seconds, and each stage's start in seconds from its start."""

    returncode: int
    seconds: float
    stage_starts: tuple[tuple[str, float], ...]

    def stage_seconds(self) -> dict[str, float]:
        """Each stage that ran: from its "Running stage" line to the next one or the end."""
        times = [start for _, start in self.stage_starts] + [self.seconds]
        return {name: times[i + 1] - times[i] for i, (name, _) in enumerate(self.stage_starts)}


def run_streamed(command: Sequence[str], cwd: Path, env: dict[str, str]) -> StreamedRun:
    """Run `command`, copying its output (stderr too) here as it comes, each "Running stage"
    line prefixed with its time."""
    start = time.perf_counter()
    starts = []
    with subprocess.Popen(
        list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:  # split at "\n" only: progress bars keep their "\r"
            line = raw.decode("utf-8", errors="replace")
            stage = RUNNING.search(line)
            if stage:
                elapsed = time.perf_counter() - start
                starts.append((stage.group(1), elapsed))
                line = f"[{elapsed:7.1f} s] {line}"
            sys.stdout.write(line)
            sys.stdout.flush()
    return StreamedRun(process.returncode, time.perf_counter() - start, tuple(starts))


def fit_seconds(project: Path) -> FitSummary:
    """Per protocol run (its folder), per model, per kind of fit (head, probe): how many
    fits it made and their seconds summed, from its runs.json, models by seconds, dearest
    first; and how many it took from another run (`reused`: they cost this run nothing).
    A run's processes share its fits, so the sum is CPU time, not the stage's."""
    summary: FitSummary = {}
    for runs_file in sorted(project.glob(RUNS_FILES)):
        models: dict[str, dict[str, dict[str, float]]] = {}
        for run in json.loads(runs_file.read_text(encoding="utf-8"))["runs"]:
            kind = models.setdefault(run["model"], {}).setdefault(
                run["head"], {"fits": 0, "seconds": 0.0, "reused": 0}
            )
            if REUSED_FROM in run:
                kind["reused"] += 1
            else:
                kind["fits"] += 1
                kind["seconds"] += run["seconds"]
        summary[runs_file.parent.relative_to(project).as_posix()] = dict(
            sorted(models.items(), key=lambda item: -sum(k["seconds"] for k in item[1].values()))
        )
    return summary


def describe_fits(summary: FitSummary) -> list[str]:
    """fit_seconds' summary as lines: one per model, then each run's total."""
    lines = []
    for folder, models in summary.items():
        for model, kinds in models.items():
            described = ", ".join(
                f"{kind['fits']} {name}s {kind['seconds']:.1f} s"
                + (f" (+{kind['reused']} reused)" if kind["reused"] else "")
                for name, kind in kinds.items()
            )
            lines.append(f"fits of {folder}: {model}: {described}")
        every = [kind for kinds in models.values() for kind in kinds.values()]
        lines.append(
            f"fits of {folder}: {sum(kind['fits'] for kind in every)} fits, "
            f"{sum(kind['seconds'] for kind in every):.1f} s in all "
            "(CPU seconds: its processes share them)"
        )
    return lines


def install(project: Path, venv: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Make a venv and install the project into it as the README's Quickstart does.

    Returns:
        The seconds of each step, and an environment whose `python` and `dvc` are the venv's.
    """
    seconds = {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    seconds["venv"] = time.perf_counter() - start
    for name, arguments in INSTALL_STEPS:
        start = time.perf_counter()
        subprocess.run([str(venv / "bin" / "python"), *arguments], cwd=project, check=True)
        seconds[name] = time.perf_counter() - start
        print(f"install {name}: {seconds[name]:.1f} s", flush=True)
    env = dict(os.environ, VIRTUAL_ENV=str(venv))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return seconds, env


def results_path(settings: dict[str, object]) -> Path:
    """Where a run's results go: dvc_repro.json, or for another workload a file named by
    its settings (dvc_repro_set_fuse.trials-3.json)."""
    if not settings:
        return RESULTS
    named = "_".join(f"{key}-{value}" for key, value in settings.items())
    return RESULTS.with_name(f"dvc_repro_set_{re.sub(r'[^A-Za-z0-9._-]+', '', named)}.json")


def parse_setting(text: str) -> tuple[str, object]:
    """'section.key=value' -> ('section.key', value), the value read as YAML (7 -> 7,
    [M4, M1] -> a list)."""
    key, equals, value = text.partition("=")
    if not equals or not key or "." not in key:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: give SECTION.KEY=VALUE, e.g. demo.images_per_report=7"
        )
    return key, yaml.safe_load(value)


def set_params(project: Path, settings: dict[str, object]) -> None:
    """Write each 'section.key' (dots nest: 'extract.images.batch_size') into the copy's
    params.yaml; the stage that reads it refuses a key it does not know."""
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    for dotted, value in settings.items():
        *sections, key = dotted.split(".")
        section = params
        for name in sections:
            if not isinstance(section.get(name), dict):  # `demo: {}` reads back as {}
                section[name] = {}
            section = section[name]
        section[key] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def _dvc_version(env: dict[str, str]) -> str:
    shown = subprocess.run(["dvc", "--version"], env=env, capture_output=True, text=True)
    return shown.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="`dvc repro demo` on a tiny demo; writes nothing"
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="first time `pip install torch==2.13.0 && pip install -e .[extract,dev]` in a "
        "new venv, then run dvc from it",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--set",
        action="append",
        type=parse_setting,
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="run another workload: change params.yaml in the copy (repeatable), e.g. "
        "--set demo.images_per_report=7 --set fuse.trials=3; results go to a file named "
        "by the settings, results/dvc_repro_set_<settings>.json",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlmf-dvc-repro-"))
    project = root / "vlmf"
    try:
        copy_project(REPO, project)
        settings = {**(SMOKE_PARAMS if args.smoke else {}), **dict(args.set)}
        if settings:
            set_params(project, settings)
            print("params.yaml: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        installed, env = {}, dict(os.environ)
        if args.install:
            installed, env = install(project, root / "venv")
        env["PYTHONUNBUFFERED"] = "1"  # dvc's "Running stage" lines arrive when printed
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
        targets = SMOKE_TARGETS if args.smoke else ()
        run = run_streamed(["dvc", "repro", *targets], project, env)
        dvc_version = _dvc_version(env)
        fits = fit_seconds(project)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if run.returncode != 0:
        raise SystemExit(f"dvc repro failed (exit code {run.returncode}); see its output above")
    stages = run.stage_seconds()
    before = run.stage_starts[0][1] if run.stage_starts else run.seconds
    print()
    for name, seconds in stages.items():
        print(f"stage {name}: {seconds:.1f} s")
    print(f"before the first stage: {before:.1f} s")
    for line in describe_fits(fits):
        print(line)
    for name, seconds in installed.items():
        print(f"install {name}: {seconds:.1f} s")
    print(f"cpu: {cpu_name()}, {cpu_threads()} threads, python {platform.python_version()}")
    print(f"total: {run.seconds:.1f} s (dvc repro; {len(stages)} stage(s) ran)")
    if not args.smoke:
        path = results_path(dict(args.set))
        path.parent.mkdir(parents=True, exist_ok=True)
        results = {
            "cpu": cpu_name(),
            "threads": cpu_threads(),
            "python": platform.python_version(),
            "dvc": dvc_version,
            "install_seconds": installed,
            "stage_seconds": stages,
            "before_first_stage_seconds": before,
            "fit_seconds": fits,
            "total_seconds": run.seconds,
            "params_set": dict(args.set),
        }
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
