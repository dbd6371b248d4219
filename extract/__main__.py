"""`python -m extract`: parse the flags into an ExtractConfig and call extract.run.run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from extract.run import ExtractConfig, run
from pipeline.cli import stage_main

DESCRIPTION = """\
Encode each unique image (by file content) or report (by normalised text) of a manifest
once with a frozen encoder and write the vectors, keyed by content, to an HDF5 feature
file with their provenance (encoder, weights fingerprint, pooling, dtype, ...).
Image files also get a path -> key table, so training later needs no images.
The manifest is validated before any model loads."""

EXAMPLES = """\
  # offline smoke run: tiny random weights of the same architectures
  python -m extract --model blip2-qformer --weights tiny \\
      --manifest demo/manifest.csv --out features/image.h5
  python -m extract --model llama3 --weights tiny \\
      --manifest demo/manifest.csv --out features/text.h5

  # real weights from a downloaded folder (hf download hfl/llama-3-chinese-8b --local-dir DIR)
  python -m extract --model llama3 --weights /models/llama-3-chinese-8b \\
      --manifest data/manifest.csv --out features/text.h5 --dtype bfloat16

  # real weights from the local Hugging Face cache (never downloads)
  python -m extract --model blip2-qformer --weights hub \\
      --manifest data/manifest.csv --out features/image.h5

  # several GPUs: one process per GPU, each encodes a share, the main one writes
  accelerate launch --num_processes 4 -m extract --model blip2-qformer --weights hub \\
      --manifest data/manifest.csv --out features/image.h5 --dtype float16

  # as the dvc pipeline calls it: settings from a params.yaml section, flags override
  python -m extract --params params.yaml --section extract_text"""


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the extract stage with command-line arguments `argv` (default: sys.argv)."""
    return stage_main(
        ExtractConfig,
        run,
        prog="python -m extract",
        section="extract_image",
        description=DESCRIPTION,
        examples=EXAMPLES,
        argv=argv,
    )


if __name__ == "__main__":
    main()
