"""FID and Inception Score of a model's samples against reference statistics, over all ranks.

torch-fidelity provides the feature network (by default "inception-v3-compat", the port of the
TensorFlow InceptionV3 that FID is defined with, so numbers compare with published ones), the
mean and covariance of the features, the Fréchet distance and the Inception Score. This module
decides which samples each rank makes, gathers their features on rank 0 in sample order (so a
result does not depend on the number of ranks), and reads references: statistics files or
latent datasets (decoded with their codec). Weights are never downloaded unless asked for.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .codecs import Codec, codec_from_manifest
from .data.manifest import load_manifest
from .data.shards import decode_npy, read_shard
from .data.storage import filesystem, redact_url
from .diffusion import GaussianDiffusion
from .distributed import broadcast_from_rank0, gather_in_order
from .export import ExportInfo
from .inference import Guidance, generate_images, sampling_copy
from .models import UNet
from .text import TextEncoder

INCEPTION = "inception-v3-compat"
# An iterator of (global sample indices (B,), uint8 images (B, 3, H, W)) for this rank.
ImageBatches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class EvaluationError(ValueError):
    """An evaluation that cannot run; the message names the input and what to do."""


def _torch_fidelity():
    try:
        import torch_fidelity
    except (ImportError, RuntimeError) as e:  # torchvision built for another torch fails with RuntimeError
        raise EvaluationError(
            f"FID needs torch-fidelity and a torchvision built for this torch ({e}); "
            "pip install 'diffusion-dist[eval]' with the torchvision release that matches your torch"
        ) from None
    return torch_fidelity


def standard_weights_path() -> Path:
    """Where torch-fidelity keeps its InceptionV3 weights: torch.hub's folder, $TORCH_HOME/hub/checkpoints."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


class FeatureNet:
    """A torch-fidelity feature extractor on a device: uint8 images -> FID features, and IS logits where it has them.

    `name` is "inception-v3-compat" or "module:Class", a FeatureExtractorBase subclass of
    one's own (another network, or a small one in tests). `weights_flag` names the option
    that sets `weights`, for error messages.
    """

    def __init__(
        self,
        name: str,
        weights: str | None,
        device: str | torch.device,
        *,
        download: bool = False,
        weights_flag: str = "--feature-weights",
    ) -> None:
        fidelity = _torch_fidelity()
        self.name = name
        cls = self._extractor_class(name, fidelity)
        self.fid_layer = cls.get_default_feature_layer_for_metric("fid")
        try:
            isc_layer = cls.get_default_feature_layer_for_metric("isc")
        except (NotImplementedError, KeyError, AssertionError, ValueError):
            isc_layer = None
        self.isc_layer = isc_layer if isc_layer in cls.get_provided_features_list() else None
        layers = [self.fid_layer] + ([self.isc_layer] if self.isc_layer else [])
        path = self._weights(name, weights, download, weights_flag)
        with torch.random.fork_rng(devices=[]):  # building the net must not draw from a training RNG
            net = cls(name, layers, feature_extractor_weights_path=path, verbose=False)
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @staticmethod
    def _extractor_class(name: str, fidelity: Any) -> type:
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if ":" not in name:
            if name != INCEPTION:
                raise EvaluationError(
                    f"feature extractor {name!r}: use {INCEPTION} (FID as published) or module:Class, "
                    "a torch_fidelity FeatureExtractorBase subclass"
                )
            return FEATURE_EXTRACTORS_REGISTRY[name]
        module, _, attribute = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise EvaluationError(f"feature extractor {name!r} cannot be imported: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, FeatureExtractorBase)):
            raise EvaluationError(f"feature extractor {name!r} is not a torch_fidelity FeatureExtractorBase subclass")
        return cls

    @staticmethod
    def _weights(name: str, weights: str | None, download: bool, weights_flag: str) -> str | None:
        """The weights file to load; a clear error when it is missing, never a silent download."""
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise EvaluationError(f"{weights_flag} {weights}: no such file")
            try:  # torch-fidelity loads it with weights_only=False: refuse anything but plain tensors first
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it unrestricted
                raise EvaluationError(f"{weights_flag} {weights}: not a plain state dict of tensors ({e})") from None
            return str(path)
        if name != INCEPTION:
            return None  # a class of one's own initialises itself
        path = standard_weights_path()
        if path.is_file():
            return str(path)
        if download:
            return None  # torch-fidelity downloads into the standard location
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        raise EvaluationError(
            f"the FID feature network's weights are missing: {path} (torch-fidelity's InceptionV3, "
            f"{INCEPTION}). Offline, download {URL_INCEPTION_V3} on a machine with internet and copy it to "
            f"{path} (or set TORCH_HOME), or pass {weights_flag} PATH; online, allow the download with "
            "--download-weights"
        )

    def check(self, stats: Mapping[str, np.ndarray], resolution: int) -> None:
        """EvaluationError unless reference statistics have this network's feature size (one dummy forward)."""
        size = self(torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8))["fid"].shape[1]
        if np.shape(stats["mu"]) != (size,) or np.shape(stats["sigma"]) != (size, size):
            raise EvaluationError(
                f"reference statistics of {np.shape(stats['mu'])[0]} features, {self.name} gives {size}: "
                "compute the reference with the same feature extractor"
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) uint8 -> {"fid": (B, D) float64 on the CPU, "isc": (B, K) float64 when available}."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
        features = self.net.convert_features_tuple_to_dict(self.net(images.to(self.device)))
        out = {"fid": features[self.fid_layer].double().cpu()}
        if self.isc_layer:
            out["isc"] = features[self.isc_layer].double().cpu()
        return out


def extract_features(batches: ImageBatches, features: FeatureNet) -> dict[str, torch.Tensor] | None:
    """Features of this rank's batches, gathered on rank 0 in the order of the global sample
    indices (a collective when a process group is up); None on the other ranks."""
    indices, parts = [], {}
    for index, images in batches:
        indices.append(index.cpu())
        for key, value in features(images).items():
            parts.setdefault(key, []).append(value)
    local = (
        torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        {k: torch.cat(v) for k, v in parts.items()},
    )
    gathered = gather_in_order(local)
    if gathered is None:
        return None
    order = torch.argsort(torch.cat([index for index, _ in gathered]))
    keys = sorted(set().union(*(rows.keys() for _, rows in gathered)))
    return {key: torch.cat([rows[key] for _, rows in gathered if key in rows])[order] for key in keys}


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of (N, D) features in float64: torch-fidelity's (unbiased covariance)."""
    if len(features) < 2:
        raise EvaluationError(f"FID needs at least 2 samples, got {len(features)}")
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.double().cpu())


def frechet_distance(stats: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (Heusel et al. 2017), by torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mine = {k: np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma")}
    theirs = {k: np.asarray(reference[k], dtype=np.float64) for k in ("mu", "sigma")}
    if mine["mu"].shape != theirs["mu"].shape:
        raise EvaluationError(
            f"reference statistics have {theirs['mu'].shape[0]} features, this extractor gives {mine['mu'].shape[0]}: "
            "compute the reference with the same feature extractor"
        )
    return fid_statistics_to_metric(mine, theirs, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and std over splits of exp(E KL(p(y|x) ‖ p(y))) (Salimans et al. 2016), by torch-fidelity."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(logits, splits=max(1, min(splits, len(logits) // 2)))
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def scores(features: Mapping[str, torch.Tensor], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{"fid", and "inception_score", "inception_score_std" where the extractor gives logits}."""
    result = {"fid": frechet_distance(statistics(features["fid"]), reference)}
    if "isc" in features:
        result["inception_score"], result["inception_score_std"] = inception_score(features["isc"])
    return result


# Samples.


def sample_labels(num_samples: int, num_classes: int) -> list[int]:
    """Balanced class labels: sample i has class i mod num_classes."""
    return [i % num_classes for i in range(num_samples)]


def sample_batches(
    model: UNet,
    diffusion: GaussianDiffusion,
    info: ExportInfo,
    labels: list[int],
    guidance: Guidance,
    *,
    steps: int,
    sampler: str,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    codec: Codec | None = None,
    progress: bool = False,
    prompts: list[str] | None = None,
    encoder: TextEncoder | None = None,
    null_text: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the samples for `labels` (and, for a text model, `prompts`, one per label,
    encoded batch by batch by `encoder`): batch b (samples b·B ...) goes to rank b mod world size and
    starts from seed + b·B, so the whole set is the same whatever the number of ranks."""
    codec = codec or codec_from_manifest(info.codec, device)
    starts = list(range(0, len(labels), batch_size))[rank::world_size]
    for start in tqdm(starts, desc=f"sampling (rank {rank})", disable=not progress, unit="batch"):
        chunk = labels[start : start + batch_size]
        text = None
        if prompts is not None:
            encoded = encoder.encode(prompts[start : start + batch_size])
            text = {"embedding": encoded.embedding, "mask": encoded.mask}
            if encoded.pooled is not None:
                text["pooled"] = encoded.pooled
        images = generate_images(
            model,
            diffusion,
            info,
            chunk,
            guidance,
            steps=steps,
            sampler=sampler,
            seed=seed + start,
            device=device,
            batch_size=len(chunk),
            codec=codec,
            text=text,
            null_text=null_text,
        )
        yield torch.arange(start, start + len(chunk)), torch.from_numpy(images).permute(0, 3, 1, 2)


def dataset_captions(url: str, limit: int, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The first caption of each of a captioned dataset's first `limit` samples, in manifest order
    (repeated from the start when it has fewer): the prompts a text model is scored with against it."""
    manifest = load_manifest(url, storage_options)
    if not manifest.get("text"):
        raise EvaluationError(f"{redact_url(url)} holds no captions: a text model is evaluated on a captioned dataset")
    fs, root = filesystem(url, storage_options)
    captions: list[str] = []
    for shard in manifest["shards"]:
        for sample in read_shard(fs, root, shard, ("captions.json",)):
            try:
                caption = json.loads(bytes(sample["captions.json"]))[0]
            except (KeyError, IndexError, TypeError, ValueError):
                caption = None
            if not isinstance(caption, str):
                raise EvaluationError(
                    f"{redact_url(url)}: sample {sample.get('__key__')!r} of {shard['name']} has no readable "
                    "captions.json (a JSON list of strings); re-encode the dataset (data_tools.encode_latents)"
                )
            captions.append(caption)
            if len(captions) == limit:
                return captions
    if not captions:
        raise EvaluationError(f"{redact_url(url)} holds no samples to take captions from")
    return [captions[i % len(captions)] for i in range(limit)]


class ClipScore:
    """CLIPScore (Hessel et al. 2021) on torchmetrics' scale: the mean over samples of
    100 · max(cos(E_image, E_text), 0), E the projected CLIP embeddings of a transformers CLIPModel.

    Each sample is clamped at 0, as in the paper; torchmetrics' CLIPScore clamps the mean instead,
    which is the same unless some cosine is negative (trained CLIP models hardly give one for an image
    and its caption). Prompts longer than the model's positions are cut to them, as torchmetrics does.
    The model comes from a local folder (config.json and weights, with the CLIPProcessor files: image
    processor and tokenizer), or from a hub id already in the Hugging Face cache; a hub id is only
    downloaded with `download`. Rank 0 gets the mean of every rank's samples."""

    def __init__(self, name_or_path: str, device: str | torch.device, *, download: bool = False) -> None:
        self.name, self.device = name_or_path, torch.device(device)
        self.model, self.processor = self._load(name_or_path, download)
        self.model.to(self.device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.total, self.count = 0.0, 0

    @staticmethod
    def _load(name: str, download: bool) -> tuple[Any, Any]:
        """(CLIPModel in float32, CLIPProcessor); EvaluationError naming `name` and what to do."""
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as transformers_logging

        what = (
            "pass a local folder holding a transformers CLIPModel (config.json, model.safetensors) and its "
            "CLIPProcessor files (save_pretrained of both), or leave --clip-model out to skip the CLIP score"
        )
        path = Path(name).expanduser()
        if path.is_dir():
            source, local_only = str(path), True
        elif path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists():
            raise EvaluationError(f"--clip-model {name}: no such folder; {what}")
        else:  # a hub id, e.g. openai/clip-vit-large-patch14: from the local cache unless downloads are allowed
            source, local_only = name, not download
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # our message, not transformers' load report
        try:
            with torch.random.fork_rng(devices=[]):  # whatever it initialises must not draw from a caller's RNG
                model, loading = CLIPModel.from_pretrained(
                    source, local_files_only=local_only, output_loading_info=True
                )
            processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
        except Exception as e:  # noqa: BLE001 - any failure to load is a bad --clip-model, said as such
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = ""
            if local_only and not path.is_dir():
                hint = (
                    "; it is no local folder, and as a hub id it is not in the Hugging Face cache: allow the "
                    "download with --download-weights (needs internet)"
                )
            raise EvaluationError(
                f"--clip-model {name}: cannot load a CLIP model and processor there ({reason}){hint}; {what}"
            ) from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        missing = [*loading.get("missing_keys", []), *loading.get("mismatched_keys", [])]
        if missing:
            raise EvaluationError(
                f"--clip-model {name}: not a complete CLIPModel, {len(missing)} weights are missing or of "
                f"another shape (e.g. {sorted(map(str, missing))[0]}); {what}"
            )
        return model.float().eval().requires_grad_(False), processor

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(E_image, E_text) of uint8 images (N, 3, H, W) and their N prompts, (N,) on the CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts")
        inputs = self.processor(
            text=prompts,
            images=[image.cpu() for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        image = _projected(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        text = _projected(
            self.model.get_text_features(
                input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
            )
        )
        normalize = torch.nn.functional.normalize
        return (normalize(image.float(), dim=-1) * normalize(text.float(), dim=-1)).sum(-1).cpu()

    def add(self, images: torch.Tensor, prompts: list[str]) -> None:
        """Score uint8 images (N, 3, H, W) against their prompts."""
        self.total += float((100 * self.cosines(images, prompts).double().clamp(min=0)).sum())
        self.count += len(prompts)

    def observe(self, batches: ImageBatches, prompts: list[str]) -> ImageBatches:
        """The batches, passed on unchanged, scored against their prompts (by global sample index) on the way."""
        for index, images in batches:
            self.add(images, [prompts[i] for i in index.tolist()])
            yield index, images

    def result(self) -> float | None:
        """The mean over every rank's samples, on rank 0; None elsewhere (a collective)."""
        parts = gather_in_order((self.total, self.count))
        return None if parts is None else sum(t for t, _ in parts) / max(1, sum(c for _, c in parts))


def _projected(features: Any) -> torch.Tensor:
    """CLIPModel.get_{image,text}_features' projected embeddings: a tensor up to transformers 4, an output
    whose pooler_output holds them from transformers 5 on."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


# References.


def load_statistics(path: str | Path, feature_extractor: str) -> dict[str, Any]:
    """Reference statistics from an .npz with mu and sigma (the convention of ADM, pytorch-fid and
    clean-fid); when the file records its feature extractor, it must be this one."""
    wanted = ("mu", "sigma", "feature_extractor", "reference", "limit", "num_samples")
    try:  # only these keys: ADM's reference batches also hold gigabytes of images
        with np.load(path, allow_pickle=False) as data:
            stats = {key: data[key] for key in wanted if key in data.files}
    except (OSError, ValueError) as e:
        raise EvaluationError(f"reference {path}: not a readable .npz ({e})") from None
    if "mu" not in stats or "sigma" not in stats:
        raise EvaluationError(f"reference {path}: holds {sorted(stats)}, needs arrays mu and sigma")
    recorded = str(stats.get("feature_extractor", feature_extractor))
    if recorded != feature_extractor:
        raise EvaluationError(
            f"reference {path} was computed with the feature extractor {recorded!r}, this evaluation uses "
            f"{feature_extractor!r}: use the same one for both"
        )
    return stats


def save_statistics(path: str | Path, stats: Mapping[str, np.ndarray], feature_extractor: str, **meta: Any) -> Path:
    """An .npz with mu, sigma, the feature extractor's name and `meta`, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, mu=stats["mu"], sigma=stats["sigma"], feature_extractor=feature_extractor, **meta)
    temporary.replace(path)
    return path


def dataset_batches(
    url: str,
    *,
    limit: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    codec: Codec | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` samples of a latent dataset (manifest order), decoded: shard s is read by rank
    s mod world size. Stored moments are decoded at their mean, the VAE's reconstruction of the image."""
    manifest = load_manifest(url, storage_options)
    codec = codec or codec_from_manifest(manifest["codec"], device)
    fs, root = filesystem(url, storage_options)
    moments = manifest["latent"]["moments"]
    first = 0
    for shard_index, shard in enumerate(manifest["shards"]):
        count = min(shard["samples"], limit - first)
        if count <= 0:
            break
        if shard_index % world_size == rank:
            samples = read_shard(fs, root, shard, ("latent.npy",))[:count]
            for start in range(0, count, batch_size):
                stored = np.stack([decode_npy(s["latent.npy"]) for s in samples[start : start + batch_size]])
                latents = torch.from_numpy(stored).float()
                if moments:
                    latents = latents.chunk(2, dim=1)[0]
                indices = torch.arange(first + start, first + min(start + batch_size, count))
                yield indices, codec.decode(latents.to(device))
        first += shard["samples"]


def image_resolution(codec_info: Mapping[str, Any], latent_shape: list[int]) -> int:
    """The side of the images that latents of this shape decode to."""
    return int(latent_shape[-1]) * int(codec_info.get("downsample", 1))


def reference_statistics(
    reference: str,
    features: FeatureNet,
    *,
    limit: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    cache: Path | None = None,
    resolution: int | None = None,
) -> dict[str, Any] | None:
    """Statistics of a reference on rank 0 (None elsewhere; a collective for datasets): an .npz as it
    is (checked against the extractor's feature size at `resolution`), or the first `limit` samples of
    a latent dataset. Rank 0 saves a dataset's statistics to `cache` and reads them back from there
    while the reference, limit and extractor are the same."""
    if reference.endswith(".npz"):
        if not Path(reference).is_file():
            raise EvaluationError(f"reference {reference}: no such statistics file")
        stats = load_statistics(reference, features.name)  # on every rank: all fail together, at start
        if resolution:
            features.check(stats, resolution)
        return stats if rank == 0 else None
    meta = {"reference": redact_url(reference), "limit": limit}
    cached = None
    if rank == 0 and cache is not None and cache.is_file():
        try:
            stats = load_statistics(cache, features.name)
            cached = stats if all(str(stats.get(k)) == str(v) for k, v in meta.items()) else None
        except EvaluationError:  # another extractor's, or damaged: computed anew
            cached = None
    if broadcast_from_rank0(cached is not None):  # rank 0 decides: all ranks compute together, or none does
        return cached
    batches = dataset_batches(
        reference,
        limit=limit,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        storage_options=storage_options,
    )
    gathered = extract_features(batches, features)
    if gathered is None:
        return None
    stats = statistics(gathered["fid"])
    meta["num_samples"] = len(gathered["fid"])
    if cache is not None:
        save_statistics(cache, stats, features.name, **meta)
    return {**stats, **meta}


class TrainingFid:
    """FID of EMA weights during training, on every rank's share of a fixed set of samples: fixed
    labels (for a text model, fixed prompts with ∅ labels, as launch.evaluate samples it) and seed, so
    the FIDs of different steps compare. Rank 0 holds the reference statistics and gets the scores; the
    model copy, the codec and the text encoder are built once, without touching the training RNG."""

    def __init__(
        self,
        info: ExportInfo,
        features: FeatureNet,
        reference: Mapping[str, np.ndarray] | None,
        guidance: Guidance,
        *,
        num_samples: int,
        steps: int,
        sampler: str,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        prompts: list[str] | None = None,
        null_text: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.info, self.features, self.reference, self.guidance = info, features, reference, guidance
        self.steps, self.sampler, self.batch_size, self.seed = steps, sampler, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.labels = sample_labels(num_samples, max(1, info.model.num_classes))
        self.prompts, self.null_text, self.encoder = prompts, null_text, None
        if prompts is not None:
            self.labels = [info.model.num_classes] * num_samples  # ∅ labels: the prompts condition a text model
            with torch.random.fork_rng(devices=[]):
                self.encoder = TextEncoder.from_record(info.text_encoder, None, self.device)
        self.model, self.diffusion, self.codec = sampling_copy(info, self.device)

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """Scores on rank 0, None elsewhere (a collective)."""
        self.model.load_state_dict(weights)
        batches = sample_batches(
            self.model,
            self.diffusion,
            self.info,
            self.labels,
            self.guidance,
            steps=self.steps,
            sampler=self.sampler,
            seed=self.seed,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            codec=self.codec,
            prompts=self.prompts,
            encoder=self.encoder,
            null_text=self.null_text,
        )
        gathered = extract_features(batches, self.features)
        return None if gathered is None else scores(gathered, self.reference)
