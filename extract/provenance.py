"""What a feature file records about its vectors, and which of it is their identity."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from extract.encoders import Encoder
from pipeline.keys import KEY_SCHEMES, file_key

RECORDED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "numpy", "h5py")
# Provenance entries that say how and when a run went, not what its vectors are: two runs
# differing only in these may share vectors (see encoder_identity).
NOT_IDENTITY = frozenset(
    {
        "created_utc",
        "extract_config",
        "manifest",
        "weights",
        "weights_folder",
        "registry_entry",
        "run",
    }
)


def output_provenance(
    encoder: Encoder,
    weights: str,
    dtype: str,
    extract_config: Mapping[str, Any],
    manifest: str,
    manifest_sha256: str | None = None,
) -> dict[str, Any]:
    """The provenance of one encoder's feature file.

    Args:
        weights: the --weights value the encoder was loaded from.
        dtype: the --dtype name.
        extract_config: the settings of this output, as a run of it alone would have them.
        manifest: the manifest's path; `manifest_sha256` its hash, if already computed.
    """
    spec = encoder.spec
    return {
        "encoder": spec.name,
        "modality": spec.modality,
        "source": spec.source,
        "loader": spec.loader,
        "registry_entry": spec.origin,
        "weights": weights,
        "weights_folder": str(encoder.weights.folder) if encoder.weights.folder else None,
        **encoder.provenance(),
        "pooling": spec.pooling,
        "dtype": dtype,
        "device_type": encoder.device.type,
        "key_scheme": KEY_SCHEMES[spec.modality],
        "package_versions": {name: metadata.version(name) for name in RECORDED_PACKAGES},
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "extract_config": dict(extract_config),
        "manifest": {"path": str(manifest), "sha256": manifest_sha256 or file_key(manifest)},
    }


def encoder_identity(provenance: Mapping[str, Any]) -> str:
    """A hash of every provenance entry that can change a vector (encoder, weights
    fingerprint, pooling, dtype, preprocessing, device type, package versions, ...): vectors
    of equal identity are interchangeable; those of another never mix."""
    identity = {name: value for name, value in provenance.items() if name not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
