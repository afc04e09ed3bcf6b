"""Datasets of latents on storage: the manifest and shard contract, fsspec storage helpers."""
