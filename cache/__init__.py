"""The feature file format, and nothing else: HDF5 files of one encoder's vectors keyed by
content, with their provenance (cache.store), written whole or not at all (cache.hdf5).

Extraction (extract) writes them and fusion (fuse) reads them; how an extraction runs
(its parts, locks and resumption) belongs to extract, not here.
"""
