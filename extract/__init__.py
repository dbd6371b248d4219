"""The extract stage: run a frozen encoder once per unique image, report or image-report pair
of a manifest and cache the vectors in an HDF5 feature file (see extract.run; the CLI is
`python -m extract`).

Encoders are registry entries: JSON files in extract/model_configs/ and, optionally, a
user's YAML file (extract.registry). Each names a loader, and every loader honours one
contract, a batch in and a float32 [N, width] tensor out (extract.encoders for what they
share, extract.blip2 and extract.auto_encoders for the encoders, extract.loaders to load
one).
"""
