"""Text encoders for text-to-image data: captions -> per-token embeddings, a mask and a pooled vector.

`TextEncoder` wraps a transformers text model and its tokenizer, loaded from one hub id or local
folder: CLIP's text tower (CLIPTextModel, CLIPTextModelWithProjection; Radford et al. 2021, as in
Stable Diffusion) or a T5 encoder (T5EncoderModel; Raffel et al. 2020, as in Imagen). Captions are
padded (and truncated) to a fixed length L, so every embedding of a dataset has one shape.

A dataset records the encoder it was made with (`TextEncoder.record`, with a sha256 over the config,
the weights and the tokenizer's files); `check_text_encoder` refuses an encoder that differs from it.
Stored embeddings are bfloat16 bit patterns in uint16 arrays (numpy has no bfloat16):
`bf16_bits` / `from_bf16_bits` convert.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_DEFAULT_LENGTH = 77  # CLIP's context; the default L when the tokenizer names none smaller

# Files a tokenizer folder may hold (transformers' names); those present are hashed into the record.
TOKENIZER_FILES = (
    "added_tokens.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
# Config keys that say where or with which library version a model was saved, not what it computes.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


class TextEncoderMismatch(ValueError):
    """A text encoder other than the one the data (or model) was made with."""


@dataclass
class TextBatch:
    """Encoded captions, padded to the encoder's max_length L."""

    embedding: torch.Tensor  # (N, L, D) float32: the last hidden state, one vector per token
    mask: torch.Tensor  # (N, L) bool: True at real tokens (special tokens included), False at padding
    pooled: torch.Tensor | None  # (N, P) float32: CLIP's pooled (projected) vector; None for T5
    truncated: int  # captions longer than L tokens, cut to L


class TextEncoder:
    """A frozen transformers text encoder plus its tokenizer, in fp32 and eval mode."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, max_length: int, folder: str | None):
        self.name, self.model, self.tokenizer, self.max_length = name, model, tokenizer, max_length
        self.folder = folder  # where the config and tokenizer files were found (None: unknown)
        self.device = next(model.parameters()).device
        config = model.config
        self.hidden_size = int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)
        if type(model).__name__ == "CLIPTextModelWithProjection":
            self.pooled_size: int | None = int(config.projection_dim)
        elif type(model).__name__ == "CLIPTextModel":
            self.pooled_size = self.hidden_size
        else:
            self.pooled_size = None
        self._sha256: str | None = None

    @classmethod
    def load(cls, name_or_path: str, max_length: int | None = None, device: str | torch.device = "cpu") -> TextEncoder:
        """The encoder and tokenizer at a hub id or local folder; max_length None: the tokenizer's, at most 77.

        Raises ValueError naming the encoder when it cannot be loaded or is not a supported kind."""
        from transformers import AutoConfig, AutoTokenizer

        # A local folder is recorded by its absolute path, so that the manifest and the export name it
        # from any working directory (launch.sample, in-training grids, a resumed encode).
        name = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(name)
            model_class = _model_class(config)
            # from_pretrained may initialise modules randomly before loading weights: keep that off the
            # caller's RNG (a sampler loading the encoder mid-run must not shift its draws).
            # weights_only: a pickled .bin checkpoint is read with torch's restricted unpickler, never
            # the general one (safetensors files need no unpickling at all).
            with torch.random.fork_rng(devices=[]):
                model = model_class.from_pretrained(name, weights_only=True)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:  # RuntimeError: size mismatch
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"cannot load the text encoder {name!r}: {reason}."
                " Pass a local folder (or a reachable or cached hub id) holding a CLIP text model or a T5 encoder "
                "(config.json, weights) together with its tokenizer files"
            ) from None
        # fp32 whatever the checkpoint's dtype: the hash and the outputs do not depend on how it was saved.
        model = model.float().to(device).eval().requires_grad_(False)
        limit = getattr(model.config, "max_position_embeddings", None)  # CLIP's learned positions; T5 has none
        if max_length is None:
            model_max = getattr(tokenizer, "model_max_length", None) or MAX_DEFAULT_LENGTH
            max_length = min(int(model_max), MAX_DEFAULT_LENGTH, limit or MAX_DEFAULT_LENGTH)
        if max_length < 2:
            raise ValueError(f"text max_length {max_length} must be >= 2 (room for a token and the end marker)")
        if limit is not None and max_length > limit:
            raise ValueError(f"text max_length {max_length} exceeds the {limit} positions of the text encoder {name!r}")
        folder = _model_folder(name)
        if folder is not None and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            # transformers may build a tokenizer with no vocabulary at all rather than fail.
            raise ValueError(
                f"cannot load the text encoder {name!r}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) beside "
                "its config.json; save the tokenizer into the same folder"
            )
        if tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer of the text encoder {name!r} has no padding token")
        return cls(name, model, tokenizer, int(max_length), folder)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextBatch:
        """Captions -> TextBatch padded to (N, L); deterministic, one forward for the whole list."""
        texts = list(texts)
        L = self.max_length
        if not texts:
            empty = torch.zeros(0, L, self.hidden_size)
            pooled = None if self.pooled_size is None else torch.zeros(0, self.pooled_size)
            return TextBatch(empty, torch.zeros(0, L, dtype=torch.bool), pooled, 0)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)  # (N, L)
        mask = tokens["attention_mask"].to(self.device).bool()  # (N, L)
        kind = type(self.model).__name__
        if kind.startswith("CLIPText"):
            # CLIP's attention is causal, so real tokens never see the padding; it runs without a padding
            # mask, as in Stable Diffusion. All L states are stored, with the mask: the UNet's cross-attention
            # leaves the padding out (Stable Diffusion's attends to all 77 states).
            out = self.model(input_ids=ids)
            pooled = out.text_embeds if kind == "CLIPTextModelWithProjection" else out.pooler_output  # (N, P)
        else:
            out = self.model(input_ids=ids, attention_mask=mask.long())
            pooled = None
        embedding = out.last_hidden_state.float()  # (N, L, D)
        return TextBatch(embedding, mask, None if pooled is None else pooled.float(), sum(n > L for n in lengths))

    @property
    def sha256(self) -> str:
        """sha256 over the config, the weights and the tokenizer's files (computed once)."""
        if self._sha256 is None:
            self._sha256 = _fingerprint(self.model, self.tokenizer, self.folder)
        return self._sha256

    def record(self) -> dict[str, Any]:
        """What a manifest or export records about this encoder; `check_text_encoder` compares two."""
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "pooled_size": self.pooled_size,
            "sha256": self.sha256,
        }

    @classmethod
    def from_record(
        cls, record: dict[str, Any], name_or_path: str | None = None, device: str | torch.device = "cpu"
    ) -> TextEncoder:
        """The encoder a record names (or `name_or_path`, e.g. a local copy), checked against the record."""
        encoder = cls.load(name_or_path or record["name"], record["max_length"], device)
        check_text_encoder(record, encoder.record())
        return encoder


def check_text_encoder(expected: dict[str, Any], actual: dict[str, Any], what: str = "the data") -> None:
    """Raise TextEncoderMismatch, naming both encoders, when `actual` is not the encoder `what` was made with.

    Everything but the name is compared: a copy of the encoder's files in another folder is the same encoder
    (a copy re-saved with save_pretrained may rewrite config.json or the tokenizer files, which are hashed)."""
    differences = [
        f"{key}: {expected.get(key)!r} there, {actual.get(key)!r} here"
        for key in sorted((expected.keys() | actual.keys()) - {"name"})
        if expected.get(key) != actual.get(key)
    ]
    if differences:
        raise TextEncoderMismatch(
            f"the text encoder {actual.get('name')!r} ({actual.get('class')}) differs from {expected.get('name')!r} "
            f"({expected.get('class')}), the one {what} was encoded with ({'; '.join(differences)}). "
            f"Use the encoder {what} was encoded with, or re-encode the captions with this one"
        )


def null_text_problem(tensors: Mapping[str, torch.Tensor], encoder: Mapping[str, Any]) -> str | None:
    """What is wrong with a null text (the encoded empty caption) for the encoder `record()`ed as
    `encoder`: None when it holds exactly "embedding" (L, D), "mask" (L,) and "pooled" (P,) if it has one."""
    expected = {"embedding": (encoder["max_length"], encoder["hidden_size"]), "mask": (encoder["max_length"],)}
    if encoder.get("pooled_size") is not None:
        expected["pooled"] = (encoder["pooled_size"],)
    found = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    if found == expected:
        return None
    return f"holds {dict(sorted(found.items()))}, the text encoder gives {dict(sorted(expected.items()))}"


def bf16_bits(x: torch.Tensor) -> np.ndarray:
    """float tensor -> uint16 array of its bfloat16 bit patterns (rounded to nearest even)."""
    return x.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> torch.Tensor:
    """uint16 array of bfloat16 bit patterns -> float32 tensor (exact)."""
    wide = np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16
    return torch.from_numpy(wide.view(np.float32))


def _model_class(config: Any) -> type:
    """The transformers class that gives token embeddings for this config, or ValueError."""
    import transformers

    kind = config.model_type
    architectures = getattr(config, "architectures", None) or []
    if kind in ("clip", "clip_text_model"):
        # A full CLIPModel holds the text projection too: use it, as SDXL's second encoder does.
        projected = any(a in ("CLIPTextModelWithProjection", "CLIPModel") for a in architectures)
        return transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    encoders = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    if kind in encoders:
        return getattr(transformers, encoders[kind])
    raise ValueError(f"model type {kind!r} is not a supported text encoder (CLIP text or T5 encoder)")


def _model_folder(name: str) -> str | None:
    """The folder holding the model's config.json: `name` itself, or its snapshot in the hub cache."""
    if os.path.isdir(name):
        return name
    try:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return os.path.dirname(path) if path else None


def _fingerprint(model: torch.nn.Module, tokenizer: Any, folder: str | None) -> str:
    """sha256 over the canonical config, every state-dict tensor (sorted names; dtype, shape, bytes) and the
    tokenizer files found in `folder` (its vocabulary when there are none), each part length-prefixed so no
    two inputs run together."""
    digest = hashlib.sha256()

    def part(tag: str, data: bytes) -> None:
        digest.update(f"{tag}\0{len(data)}\0".encode())
        digest.update(data)

    config = model.config.to_dict()
    if folder is not None and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), "rb") as f:
            config = json.load(f)  # the saved file: independent of the library's defaults for unset keys
    config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    part("config", json.dumps(config, sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        part(f"tensor:{key}:{tensor.dtype}:{list(tensor.shape)}", tensor.view(torch.uint8).numpy().tobytes())
    found = [os.path.join(folder, n) for n in TOKENIZER_FILES if folder is not None]
    found = [path for path in found if os.path.isfile(path)]
    for path in found:
        with open(path, "rb") as f:
            part(f"tokenizer:{os.path.basename(path)}", f.read())
    if not found:
        part("vocabulary", json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    return digest.hexdigest()
