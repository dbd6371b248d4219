"""`python -m fuse`: train VLMF-Net heads on cached features and evaluate them."""

from fuse.run import FuseConfig, run
from pipeline.cli import stage_main

DESCRIPTION = """\
Train the VLMF-Net head (image projector -> 512, report projector -> 2048, L2-normalise,
concatenate, MLP classifier; loss = cross-entropy + 0.1 x NT-Xent) on cached encoder
features, with image-only and report-only ablations, model selection on the validation
split, and metrics on the test and external sets. Needs the manifest and the two feature
files, not the images or the encoders. Settings: defaults < --params section < flags."""

EXAMPLES = """\
  python -m fuse --manifest data/demo/manifest.csv \\
      --image-features features/image.h5 --text-features features/text.h5 \\
      --metrics reports/metrics.json --plots reports --models models
  python -m fuse --params params.yaml --manifest ... --variants fusion --epochs 20 --seed 3
"""

if __name__ == "__main__":
    stage_main(
        FuseConfig,
        run,
        prog="python -m fuse",
        section="fuse",
        description=DESCRIPTION,
        examples=EXAMPLES,
    )
