"""What every stage shares: the manifest schema, configuration, splits and metrics.

This package imports no model code, so a laptop that only retrains heads needs none.
"""
