"""Data: manifests, video decoding, synthetic videos (more to come: buckets, the Zarr store, the loader)."""
