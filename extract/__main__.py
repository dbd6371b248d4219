"""`python -m extract`: parse the flags into an ExtractConfig and call extract.run.run."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from extract.registry import available_encoders, describe, load_registry
from extract.run import ExtractConfig, run
from pipeline.cli import stage_main
from pipeline.config import read_params_section
from pipeline.errors import exit_on_user_error

DESCRIPTION = """\
Encode each unique image (by file content), report (by normalised text) or, for pair
encoders such as ViLT, image-report pair of a manifest once with a frozen encoder and write
the vectors, keyed by content, to an HDF5 feature file with their provenance (encoder,
weights fingerprint, pooling, dtype, ...). Image and pair files also get an image path ->
image key table, so training later needs no images.
Several --model encoders of one modality run as one pass into --out FOLDER, one file each
(FOLDER/<model>.h5, the file a run of that model alone writes): each image file is read
and decoded once for all of them, and encoders of one checkpoint (blip2-qformer and
blip2-vit; poolings of one model) load it once and share each forward.
The manifest is validated before any model loads; image files that are missing, empty or
damaged and reports that are empty or hold control characters are skipped, recorded in the
file and summarised (--strict true refuses them instead). Finished batches are saved at
once, so running the same command again after a crash continues where it stopped, and an
output that already holds every vector is left untouched ("up to date").

python -m extract --list [--registry FILE] [--params params.yaml --section S] prints every
encoder, built-in and from the registry file, with its modality, loader, pooling, width,
source and the file it came from, and exits. Built-in encoders:
""" + textwrap.fill(
    ", ".join(available_encoders()),
    width=88,
    initial_indent="  ",
    subsequent_indent="  ",
    break_on_hyphens=False,
)

EXAMPLES = """\
  # offline smoke run: tiny random weights of the same architectures
  python -m extract --model blip2-qformer --weights tiny \\
      --manifest demo/manifest.csv --out features/image.h5
  python -m extract --model llama3 --weights tiny \\
      --manifest demo/manifest.csv --out features/text.h5

  # one pass, several outputs (one modality): features/images/blip2-qformer.h5, ...;
  # each image read and decoded once, BLIP-2 loaded once and its ViT run once per batch
  python -m extract --model blip2-qformer blip2-vit clip-image --weights tiny \\
      --manifest demo/manifest.csv --out features/images
  # --pooling (and --weights) take one value for all, or one per model
  python -m extract --model llama3 clip-text --pooling last auto \\
      --manifest demo/manifest.csv --out features/reports

  # real weights from a downloaded folder (hf download hfl/llama-3-chinese-8b --local-dir DIR)
  python -m extract --model llama3 --weights /models/llama-3-chinese-8b \\
      --manifest data/manifest.csv --out features/text.h5 --dtype bfloat16

  # your own encoders (a YAML file naming local folders), then one of them
  python -m extract --list --registry my_encoders.yaml
  python -m extract --registry my_encoders.yaml --model my-bert --weights hub \\
      --manifest data/manifest.csv --out features/my-bert.h5

  # real weights from the local Hugging Face cache (never downloads)
  python -m extract --model blip2-qformer --weights hub \\
      --manifest data/manifest.csv --out features/image.h5

  # several GPUs: one process per GPU, each encodes a share of the batches into parts,
  # the main one writes every file (several CPU processes: add --device cpu; see the
  # README's Long runs; accelerate launch --cpu would start one process only)
  accelerate launch --multi_gpu --num_processes 4 -m extract --model blip2-qformer \\
      blip2-vit --weights hub --manifest data/manifest.csv --out features/images \\
      --dtype float16

  # killed, or out of disk? run the same command again: finished batches are kept (in
  # FILE.h5.parts/). A second run on the same --out waits up to an hour for the first:
  python -m extract --params params.yaml --section extract.reports --wait-for-lock 3600

  # as the dvc pipeline calls it: settings from a params.yaml section (one per group of
  # one modality: model: [blip2-qformer, blip2-vit, ...], out: features/images), flags
  # override
  python -m extract --params params.yaml --section extract.images"""


DEFAULT_SECTION = "extract.images"  # dvc.yaml's image group, in params.yaml's extract


def list_encoders(argv: Sequence[str]) -> None:
    """Print the registry (built-in entries and --registry's, or the params section's)."""
    parser = argparse.ArgumentParser(prog="python -m extract --list")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--registry")
    parser.add_argument("--params")
    parser.add_argument("--section", default=DEFAULT_SECTION)
    args, _ = parser.parse_known_args(argv)
    registry_file = args.registry
    if registry_file is None and args.params:
        registry_file = read_params_section(args.params, args.section).get("registry", "")
    print(describe(load_registry(registry_file or "")))


def main(argv: Sequence[str] | None = None) -> Path | None:
    """Run the extract stage with command-line arguments `argv` (default: sys.argv); with
    --list, print the encoders instead and return None."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if "--list" in arguments and not {"-h", "--help"} & set(arguments):
        exit_on_user_error(lambda: list_encoders(arguments))
        return None
    return stage_main(
        ExtractConfig,
        run,
        prog="python -m extract",
        section=DEFAULT_SECTION,
        description=DESCRIPTION,
        examples=EXAMPLES,
        argv=arguments,
    )


if __name__ == "__main__":
    main()
