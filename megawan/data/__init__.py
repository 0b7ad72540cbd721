"""Data: manifests, video decoding (PyAV, DALI), buckets, precompute into the Zarr latent store (and its typed
metadata), and the bucketed training loader. Demo-only data (synthetic shapes, tiny encoders and dataset) lives
in megawan.demo."""
