"""Feature files made directly with the cache writer, so fuse tests need no encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import FeatureSet, write_features
from pipeline.keys import text_key

IMAGE_WIDTH, TEXT_WIDTH = 12, 20


def write_synthetic_cache(
    folder: Path,
    patients: int = 60,
    images_per_patient: int = 4,
    seed: int = 0,
    image_signal: float = 0.8,
    text_signal: float = 0.8,
) -> dict[str, Path]:
    """A manifest and two feature files where each modality carries part of the label:
    each vector is normal around signal x label (0 signal: that modality is noise)."""
    rng = np.random.default_rng(seed)
    rows, image_vectors, text_vectors = [], {}, {}
    for patient in range(patients):
        label = patient % 2
        report = f"患者{patient}：声带所见 {rng.integers(1000)}"
        text_vectors[text_key(report)] = rng.normal(label * text_signal, 1.0, TEXT_WIDTH)
        for image in range(images_per_patient):
            path = f"images/p{patient:03d}_{image}.png"
            image_vectors[path] = rng.normal(label * image_signal, 1.0, IMAGE_WIDTH)
            rows.append(
                {
                    "image_path": path,
                    "report_text": report,
                    "label": ("VCD", "GC")[label],
                    "patient_id": f"P{patient:03d}",
                    "split": "external" if patient >= patients - 10 else "",
                }
            )
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    # The image key is a made-up content hash: fuse must only go through the sources table.
    image_keys = {path: f"key-{index}" for index, path in enumerate(image_vectors)}
    image_file = write_features(
        folder / "image.h5",
        FeatureSet(
            keys=tuple(image_keys.values()),
            vectors=np.stack(list(image_vectors.values())).astype(np.float32),
            provenance={"encoder": "blip2-qformer", "modality": "image", "pooling": "mean"},
            sources=image_keys,
        ),
    )
    text_file = write_features(
        folder / "text.h5",
        FeatureSet(
            keys=tuple(text_vectors),
            vectors=np.stack(list(text_vectors.values())).astype(np.float32),
            provenance={"encoder": "llama3", "modality": "text", "pooling": "mean"},
        ),
    )
    return {"manifest": manifest, "image": image_file, "text": text_file}


@pytest.fixture
def synthetic_cache(tmp_path: Path) -> dict[str, Path]:
    return write_synthetic_cache(tmp_path)


@pytest.fixture(scope="session")
def cache_writer():
    """write_synthetic_cache itself, for module-scoped fixtures that change what it writes."""
    return write_synthetic_cache
