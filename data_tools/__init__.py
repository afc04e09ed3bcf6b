"""Offline tools that prepare datasets for training: encode_latents, inspect_shards, make_digits."""

import sys


def progress_interval() -> float:
    """Seconds between progress-bar updates: frequent on a terminal, sparse in a batch job's log file."""
    return 0.1 if sys.stderr.isatty() else 30.0
