"""The HDF5 feature store that extraction writes and fusion reads."""
