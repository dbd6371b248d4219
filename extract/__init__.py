"""The extract stage: run frozen encoders once per unique image, report or image-report pair
of a manifest and cache the vectors in HDF5 feature files, one per encoder (see extract.run;
the CLI is `python -m extract`). Several encoders of one modality are one pass: each image
file read once (extract.items), each checkpoint loaded once and run once per batch for the
encoders that share it (extract.loaders, extract.encoding), finished work kept per output
(extract.resume, extract.parts), under one process or several (extract.processes).

Encoders are registry entries: JSON files in extract/model_configs/ and, optionally, a
user's YAML file (extract.registry). Each names a loader, and every loader honours one
contract, a batch in and a float32 [N, width] tensor out (extract.encoders for what they
share, extract.blip2 and extract.auto_encoders for the encoders, extract.loaders to load
them).
"""
