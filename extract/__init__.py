"""The extract stage: run a frozen encoder once per unique image or report of a manifest and
cache the vectors in an HDF5 feature file (see extract.run; the CLI is `python -m extract`).

Encoders are registered as JSON files in extract/model_configs/ (extract.registry) and
loaded behind one contract, a batch in and a float32 [N, width] tensor out
(extract.encoders).
"""
