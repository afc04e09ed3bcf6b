"""Offline tools that prepare datasets for training: python -m data_tools.encode_latents, inspect_shards, demo data."""
