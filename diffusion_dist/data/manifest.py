"""The dataset contract's manifest.json: what a dataset holds and how it was encoded.

A dataset is a URL prefix holding manifest.json and tar shards (docs/contracts.md, "Dataset";
shards.py writes and reads the samples). The manifest lists every shard with its sample count, byte size
and sha256, the codec with its scaling, the latent shape and layout, the labels, and for captioned data
the text encoder and the file holding its encoding of the empty caption (`load_null_text`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..text import null_text_problem
from .storage import filesystem, join, read_bytes, redact_url

if TYPE_CHECKING:
    import torch

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
    if "text" in manifest:
        validate_text(manifest["text"], where)
    return manifest


def _count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def validate_text(text: Any, where: str) -> None:
    """Check the optional `text` record (captioned data); raise DatasetError naming the field at fault."""

    def bad(field: str) -> DatasetError:
        return DatasetError(f"{where}: manifest field text.{field} is missing or of the wrong type")

    if not isinstance(text, dict):
        raise DatasetError(f"{where}: manifest field text is not an object")
    encoder, captions = text.get("encoder"), text.get("captions")
    if not isinstance(encoder, dict):
        raise bad("encoder")
    for key, ok in (
        ("name", lambda v: isinstance(v, str)),
        ("class", lambda v: isinstance(v, str)),
        ("max_length", lambda v: _count(v, 1)),
        ("hidden_size", lambda v: _count(v, 1)),
        ("pooled_size", lambda v: v is None or _count(v, 1)),
        ("sha256", lambda v: isinstance(v, str)),
    ):
        if key not in encoder or not ok(encoder[key]):
            raise bad(f"encoder.{key}")
    if not isinstance(text.get("null"), str) or not text["null"]:
        raise bad("null")
    if not isinstance(captions, dict):
        raise bad("captions")
    for key in ("max_per_image", "total", "truncated"):
        if not _count(captions.get(key)):
            raise bad(f"captions.{key}")
    missing = captions.get("missing")
    if not isinstance(missing, dict) or missing.get("policy") not in ("skip", "empty"):
        raise bad("captions.missing.policy")
    if not _count(missing.get("count")):
        raise bad("captions.missing.count")
    examples = text.get("examples", [])
    if not (isinstance(examples, list) and all(isinstance(e, str) for e in examples)):
        raise bad("examples")


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


def load_null_text(
    url: str, storage_options: Mapping[str, Any] | None = None, manifest: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The dataset's encoded empty caption (the unconditional input of classifier-free guidance):
    {"embedding": (L, D) float32, "mask": (L,) bool, "pooled": (P,) float32 when the encoder has one}.

    `manifest`: the dataset's, if already loaded. DatasetError when the dataset has no text or the file
    does not match the manifest's encoder."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = redact_url(url)
    manifest = load_manifest(url, storage_options) if manifest is None else manifest
    if "text" not in manifest:
        raise DatasetError(f"{where}: the dataset has no captions (no text record in its {MANIFEST})")
    encoder = manifest["text"]["encoder"]
    fs, root = filesystem(url, storage_options)
    name = manifest["text"]["null"]
    try:
        tensors = load(read_bytes(fs, join(root, name)))
    except FileNotFoundError:
        raise DatasetError(f"{where}: {name} is missing; re-run encode_latents to finish the dataset") from None
    except SafetensorError as e:
        raise DatasetError(f"{where}: {name} is not a readable safetensors file ({e})") from None
    problem = null_text_problem(tensors, encoder)
    if problem:
        raise DatasetError(f"{where}: {name} {problem}; re-encode the dataset's captions (data_tools.encode_latents)")
    null = {key: tensor.float() for key, tensor in tensors.items()}
    null["mask"] = tensors["mask"].bool()
    return null
