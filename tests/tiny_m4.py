"""What the tests of the steps that apply a saved head start from: a tiny demo, its
tiny-encoder features and an M4 protocol run with saved heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from extract.run import ExtractConfig
from extract.run import run as extract
from fuse.protocol import ProtocolConfig
from fuse.protocol import run as protocol
from pipeline.demo.generate import DemoConfig
from pipeline.demo.generate import run as demo


def train_tiny_m4(
    folder: Path, patients: int, external_patients: int, **settings: Any
) -> dict[str, Any]:
    """Demo (3 images a report), blip2-qformer and llama3 features, M4 heads in
    folder/models and the protocol in folder/protocol; `settings` go to the protocol."""
    manifest = demo(
        DemoConfig(
            out=str(folder / "demo"),
            patients=patients,
            external_patients=external_patients,
            images_per_report=3,
        )
    )
    features = []
    for encoder in ("blip2-qformer", "llama3"):
        out = folder / f"{encoder}.h5"
        extract(ExtractConfig(model=encoder, manifest=str(manifest), out=str(out), num_workers=0))
        features.append(str(out))
    protocol(
        ProtocolConfig(
            manifest=str(manifest),
            features=tuple(features),
            out=str(folder / "protocol"),
            heads=str(folder / "models"),
            models=("M4",),
            learning_rate=1e-3,
            **settings,
        )
    )
    return {"folder": folder, "manifest": manifest, "features": features}
