"""The dataset contract's manifest.json: what a dataset holds and how it was encoded.

A dataset is a URL prefix holding manifest.json and tar shards (docs/contracts.md, "Dataset";
shards.py writes and reads the samples). The manifest lists every shard with its sample count, byte size
and sha256, the codec with its scaling, the latent shape and layout, and the labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .storage import filesystem, join, read_bytes, redact_url

FORMAT = "diffusion-dist-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the URL and what to do."""


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, fixed separators, so equal manifests are equal bytes."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


REQUIRED = {
    "format": str,
    "version": int,
    "codec": dict,
    "latent": dict,
    "num_samples": int,
    "shards": list,
}


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Check the manifest's structure; raise DatasetError naming the field at fault."""
    if not isinstance(manifest, dict):
        raise DatasetError(f"{where}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{where}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise DatasetError(f"{where}: manifest field {key!r} is missing or not of type {kind.__name__}")
    if manifest["version"] > FORMAT_VERSION:
        raise DatasetError(
            f"{where}: manifest version {manifest['version']} is newer than this code reads ({FORMAT_VERSION}); "
            "upgrade diffusion-dist"
        )
    for section, key, kind in (
        ("latent", "shape", list),
        ("latent", "moments", bool),
        ("codec", "name", str),
        ("codec", "scaling_factor", (int, float)),
    ):
        if not isinstance(manifest[section].get(key), kind):
            raise DatasetError(f"{where}: manifest field {section}.{key} is missing or of the wrong type")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not {"name", "samples", "bytes", "sha256"} <= shard.keys():
            raise DatasetError(f"{where}: shard entry {i} lacks name/samples/bytes/sha256")
        if not (isinstance(shard["samples"], int) and shard["samples"] >= 0 and isinstance(shard["bytes"], int)):
            raise DatasetError(f"{where}: shard entry {i} has a bad sample count or byte size")
    if sum(s["samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        raise DatasetError(f"{where}: num_samples does not equal the sum of shard sample counts")
    return manifest


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The validated manifest of the dataset at `url`, or a DatasetError that says what is wrong."""
    where = redact_url(url)
    fs, root = filesystem(url, storage_options)
    path = join(root, MANIFEST)
    try:
        data = read_bytes(fs, path)
    except FileNotFoundError:
        raise DatasetError(
            f"{where}: no {MANIFEST}; encode a dataset there with python -m data_tools.encode_latents "
            "(or finish a split run with --finalize)"
        ) from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: {MANIFEST} is not valid JSON ({e})") from None
    return validate_manifest(manifest, where)
