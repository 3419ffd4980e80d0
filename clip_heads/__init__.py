"""clip-heads: one frozen-CLIP pass into an HDF5 feature store, then light heads in seconds."""

__version__ = "0.1.0"
