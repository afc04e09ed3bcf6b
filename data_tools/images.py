"""Image inputs for encode_latents: image folders and img2dataset-style tar shards, on any fsspec URL.

Work is split into units that every part of a split run computes identically: a folder's
sorted files in chunks of --shard-size, or one input tar each. Units are read inside the
process that decodes them (s3fs is not fork-safe), and decoded images are center-cropped and
resized with ADM's recipe.

Captions come from beside each image in a tar (`<key>.txt`, or `<key>.json` with "captions" or
"caption"), or for a folder from a sidecar JSON-lines file (`read_captions`). Every caption is
stripped of surrounding whitespace, and empty ones are dropped: an image whose captions are all
empty has none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError

from diffusion_dist.data.storage import PERMANENT_ERRORS, filesystem, join, redact_text, redact_url, retry

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes


class InputError(ValueError):
    """An input that cannot be encoded; raised before anything is written."""


class BadImage(Exception):
    """One source item that cannot be decoded; it is skipped and listed with this reason."""


@dataclass
class RawItem:
    """A source item before decoding."""

    key: str  # the sample's __key__: stable, derived from the source item
    source: str  # where it came from, for messages and the manifest's skip list
    label: int | None
    data: bytes | None = None  # None: could not be read (see reason)
    captions: list[str] = field(default_factory=list)  # [] when the input has none
    reason: str | None = None


@dataclass
class ImageSource:
    """Base of the two input kinds: a URL, its storage options, and a per-process filesystem."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        self._fs = None
        self._fs_pid = -1

    def filesystem(self):
        # Created in the process that uses it: filesystems must not cross a fork.
        if self._fs_pid != os.getpid():
            self._fs, _ = filesystem(self.url, self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def canonical_url(self) -> str:
        """The input as an absolute URL (protocol included), whatever spelling the user gave."""
        head, brace, tail = self.url.partition("{")  # brace patterns are kept as written
        fs, path = filesystem(head, self.storage_options)
        return fs.unstrip_protocol(path) + ("/" if brace and head.endswith("/") else "") + brace + tail

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_fs_pid": -1}


@dataclass
class FolderSource(ImageSource):
    """An image folder: class subfolders (sorted names give labels, ImageNet layout) or flat (unlabelled)."""

    root: str = ""  # the folder's path inside its filesystem
    files: list[str] = field(default_factory=list)  # relative paths, sorted
    shard_size: int = 1000
    captions: dict[str, list[str]] = field(default_factory=dict)  # relative path -> captions (read_captions)
    captions_url: str | None = None  # the captions file as an absolute URL; None without one
    captions_sha256: str | None = None  # of the captions file

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any], shard_size: int) -> FolderSource:
        fs, root = filesystem(url, storage_options)
        where = redact_url(url)
        if not fs.isdir(root):
            raise InputError(f"--input {where}: no such folder (or it is not a folder)")
        paths = sorted(fs.find(root))
        files = [p[len(root) :].lstrip("/") for p in paths if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        if not files:
            raise InputError(
                f"--input {where}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder or below"
            )
        nested = {f.split("/", 1)[0] for f in files if "/" in f}
        if nested and any("/" not in f for f in files):
            raise InputError(
                f"--input {where}: images both at the top level and in subfolders; use class subfolders only "
                "(labelled) or a flat folder (unlabelled)"
            )
        keys: dict[str, str] = {}
        for f in files:
            key = _key_for(f)
            if key in keys:
                raise InputError(f"--input {where}: {keys[key]!r} and {f!r} map to the same sample key {key!r}")
            keys[key] = f
        return cls(url, dict(storage_options), sorted(nested) if nested else None, root, files, shard_size)

    @property
    def num_units(self) -> int:
        return -(-len(self.files) // self.shard_size)

    def unit_size(self, unit: int) -> int:
        return len(self.files[unit * self.shard_size : (unit + 1) * self.shard_size])

    def iter_unit(self, unit: int) -> Iterator[RawItem]:
        fs = self.filesystem()
        labels = {name: i for i, name in enumerate(self.class_names or [])}
        for relative in self.files[unit * self.shard_size : (unit + 1) * self.shard_size]:
            label = labels[relative.split("/", 1)[0]] if self.class_names else None
            item = RawItem(_key_for(relative), relative, label, captions=list(self.captions.get(relative, ())))
            try:
                item.data = retry(lambda r=relative: fs.cat_file(join(self.root, r)), what=f"reading {relative}")
            except PERMANENT_ERRORS as e:
                # Bad input (vanished, permission denied): skipped and listed. Transient storage
                # errors that outlast the retries propagate and stop the run instead.
                item.reason = f"unreadable: {type(e).__name__}"
            yield item


@dataclass
class TarSource(ImageSource):
    """WebDataset image shards as img2dataset writes them: an image member plus optional cls, json, txt."""

    urls: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # each tar's path below the shards' common folder

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any]) -> TarSource:
        urls = list(braceexpand(url))
        fs, _ = filesystem(urls[0], storage_options)
        missing = [u for u in urls if not fs.exists(filesystem(u, storage_options)[1])]
        if missing:
            shown = ", ".join(redact_url(u) for u in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise InputError(f"--input: {len(missing)} of {len(urls)} tar shards do not exist: {shown}")
        # Keys derive from the path below the common folder, so train/0.tar and val/0.tar differ.
        common = os.path.commonprefix(urls).rpartition("/")[0]
        names = [u[len(common) :].strip("/").removesuffix(".tar") for u in urls]
        if len(set(names)) != len(names):
            raise InputError("--input: the brace pattern names the same tar shard twice")
        return cls(url, dict(storage_options), None, urls, names)

    @property
    def num_units(self) -> int:
        return len(self.urls)

    def unit_size(self, unit: int) -> int | None:
        return None  # known only once the tar is read

    def iter_unit(self, unit: int) -> Iterator[RawItem]:
        url, shard = self.urls[unit], self.names[unit]
        fs, path = self.filesystem(), filesystem(url, self.storage_options)[1]
        # One GET for the whole tar, retried from the start on transient errors; a read that
        # still fails stops the run (naming the tar) rather than silently dropping its images.
        data = retry(lambda: fs.cat_file(path), what=f"reading {redact_url(url)}")
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        directory, _, base = member.name.rpartition("/")
                        stem, _, extension = base.partition(".")
                        name = f"{directory}/{stem}" if directory else stem
                        members.setdefault(name, {})[extension.lower()] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            # Complete bytes that are not a valid tar: bad input, deterministic. The samples read
            # before the damage are kept, except the last, which may have lost members.
            yield RawItem(f"{shard}/_damaged", redact_url(url), None, reason=f"damaged tar: {redact_text(str(e))}")
            if members:
                members.popitem()
        for name, parts in members.items():
            yield self._item(shard, name, parts)

    @staticmethod
    def _item(shard: str, name: str, parts: dict[str, bytes]) -> RawItem:
        item = RawItem(_key_for(f"{shard}/{name}"), f"{shard}/{name}", None)
        item.data = next((parts[e] for e in TAR_IMAGE_EXTENSIONS if e in parts), None)
        if item.data is None:
            item.reason = "no image member (jpg/jpeg/png/webp)"
        if "cls" in parts:
            try:
                item.label = int(parts["cls"].decode().strip())
            except ValueError:
                item.reason = f"bad cls label {parts['cls'][:20]!r}"
        item.captions = _tar_captions(parts)
        return item


def _tar_captions(parts: dict[str, bytes]) -> list[str]:
    """An img2dataset item's captions: json "captions" (a list), else txt, else json "caption"; a json
    member that is not an object of strings gives none."""
    data: Any = None
    if "json" in parts:
        try:
            data = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            data = None
    if isinstance(data, dict) and isinstance(data.get("captions"), list):
        return _clean([c for c in data["captions"] if isinstance(c, str)])
    if "txt" in parts:
        return _clean([parts["txt"].decode("utf-8", "replace")])
    if isinstance(data, dict) and isinstance(data.get("caption"), str):
        return _clean([data["caption"]])
    return []


def _clean(captions: list[str]) -> list[str]:
    return [c.strip() for c in captions if c.strip()]


def read_captions(url: str, storage_options: Mapping[str, Any], files: list[str]) -> tuple[dict[str, list[str]], str]:
    """The sidecar captions of an image folder, and the file's sha256.

    One JSON object a line: {"file": "<path relative to the folder>", "caption": "..."} or
    {"file": ..., "captions": ["...", ...]}; other keys are ignored, blank lines skipped, and an image
    named on several lines gets their captions in line order. Any malformed line, or a file that is
    not an image of the folder, is an InputError naming the captions file and the line."""
    where = redact_url(url)
    fs, path = filesystem(url, storage_options)
    try:
        data = retry(lambda: fs.cat_file(path), what=f"reading {where}")
    except FileNotFoundError:
        raise InputError(f"--captions {where}: no such file") from None
    except (IsADirectoryError, PermissionError) as e:
        raise InputError(f"--captions {where}: cannot be read ({type(e).__name__})") from None
    known = set(files)
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue

        def bad(problem: str, number: int = number) -> InputError:
            return InputError(f"--captions {where} line {number}: {problem}")

        try:
            entry = json.loads(line)
        except UnicodeDecodeError:
            raise bad("not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise bad('expected a JSON object with a "file" string')
        if ("caption" in entry) == ("captions" in entry):
            raise bad('give exactly one of "caption" (a string) and "captions" (a list of strings)')
        texts = [entry["caption"]] if "caption" in entry else entry["captions"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad('"caption" must be a string, "captions" a non-empty list of strings')
        relative = posixpath.normpath(entry["file"])
        if relative not in known:
            raise bad(f"{entry['file']!r} is not an image of the input folder")
        captions.setdefault(relative, []).extend(_clean(texts))
    return captions, hashlib.sha256(data).hexdigest()


def names_tar_shards(url: str) -> bool:
    """Whether an input URL names .tar files (brace patterns allowed) rather than an image folder."""
    return url.rstrip("/").endswith(".tar") or ".tar}" in url


def open_source(
    url: str, storage_options: Mapping[str, Any], shard_size: int, captions: str | None = None
) -> FolderSource | TarSource:
    """A tar-shard source when the URL names .tar files, else an image folder; `captions`: a folder's
    sidecar captions file (read_captions), on the same storage."""
    if names_tar_shards(url):
        if captions is not None:
            raise InputError(
                "--captions applies to image folders; tar inputs carry their captions beside each image "
                "(<key>.txt, or <key>.json with a caption or captions field)"
            )
        return TarSource.open(url, storage_options)
    source = FolderSource.open(url, storage_options, shard_size)
    if captions is not None:
        source.captions, source.captions_sha256 = read_captions(captions, storage_options, source.files)
        fs, path = filesystem(captions, storage_options)
        source.captions_url = fs.unstrip_protocol(path)
    return source


def _key_for(relative_path: str) -> str:
    """A WebDataset key: the path without its extension, with no '.' (the member-extension separator)."""
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    return stem.replace(".", "_")


def decode_image(data: bytes) -> Image.Image:
    """An RGB PIL image from encoded bytes, or BadImage with the reason.

    Grayscale, CMYK, palette and 16-bit images are converted; transparency is composited
    onto white, so transparent pixels do not become arbitrary colours.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too many pixels (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image") from None
    except OSError as e:
        raise BadImage("truncated" if "truncated" in str(e) else f"decode error: {e}") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"decode error: {e}") from None

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Deep grayscale: PIL's convert("RGB") would clip, not scale. Integer modes hold 16-bit
        # samples (PNG, TIFF); float images are taken to lie in [0, 1].
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        array = np.asarray(image, dtype=np.float64) * scale
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's preprocessing: halve with a box filter while the short side is >= 2× the target, resize the
    short side to `resolution` with bicubic filtering, then center-crop. Returns (R, R, 3) uint8.

    Images longer than twice their width (or the reverse) are first cut to 2:1 around the
    centre: the crop keeps only the central square anyway, and a 1×20000 banner would
    otherwise be resized to gigapixels."""
    width, height = image.size
    if max(width, height) > 2 * min(width, height):
        keep = 2 * min(width, height)
        left, top = (width - min(width, keep)) // 2, (height - min(height, keep)) // 2
        image = image.crop((left, top, left + min(width, keep), top + min(height, keep)))
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]
