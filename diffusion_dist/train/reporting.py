"""What a run reports, beside MLflow tracking: metrics lines, sample grids, in-training FID, plots.

The loop calls `MetricsLog.add` per micro batch and `Reports.after_step` per optimizer step;
everything periodic (metric logs, grids, FID) is decided here, at step boundaries, on all ranks
together. Rank 0 writes run.dir/metrics.jsonl and run.dir/samples/ and hands records to the
Tracker, which delivers them to MLflow in the background.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..config import Config, to_yaml
from ..data.manifest import DatasetError, load_manifest
from ..data.storage import redact_url
from ..data.stream import LatentLoader
from ..diffusion import timestep_quartile_sums
from ..distributed import ProcessInfo, all_reduce_sum
from ..evaluation import FeatureNet, TrainingFid, dataset_captions, image_resolution, reference_statistics
from ..export import ExportInfo
from ..inference import Guidance, SampleGrid
from ..pictures import plot_training_curves, save_png
from .checkpoint import Progress
from .ema import EMA
from .engine import deepspeed_version
from .tracking import Tracker, code_version, local_store, run_params, system_metrics, tracking_uri

log = logging.getLogger("diffusion_dist.train")


class MetricsLog:
    """Sums kept on the device between log steps (no host sync per step); at a log step they are
    all-reduced once and rank 0 appends a JSON line to run.dir/metrics.jsonl."""

    def __init__(
        self, run_dir: Path, rank: int, num_timesteps: int, device: torch.device, accuracy: bool = False
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.rank, self.num_timesteps, self.device = rank, num_timesteps, device
        self.accuracy = accuracy  # a classifier's: accuracy and accuracy_q0..q3
        self.reset()

    def reset(self) -> None:
        # Rows, each by timestep quartile: loss sums, sample weights, correct predictions (classifiers).
        self.sums = torch.zeros(3, 4, dtype=torch.float64, device=self.device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norms = 0
        self.data_wait = 0.0  # seconds this rank waited for batches
        self.started = time.perf_counter()
        self.steps = 0

    @contextmanager
    def paused(self):
        """Time spent here (checkpoints, sample grids) does not count against step time and throughput."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused

    def next_batch(self, batches):
        """next(batches), its wait counted as data wait."""
        waited = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - waited
        return batch

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        weights = terms.get("labelled", torch.ones_like(terms["loss"]))  # a classifier's unlabelled samples: 0
        for row, values in enumerate((terms["loss"], weights, terms.get("correct"))):
            if values is not None:
                self.sums[row] += timestep_quartile_sums(terms["t"], values, self.num_timesteps)[0]

    def end_step(self, grad_norm: float | torch.Tensor | None) -> None:
        """After an optimizer step; grad_norm is its global gradient norm (None: skipped or not known)."""
        self.steps += 1
        if grad_norm is not None:
            self.grad_norm_sum += torch.as_tensor(grad_norm, dtype=torch.float64, device=self.device)
            self.grad_norms += 1

    def write(self, progress: Progress, lr: float, samples_per_step: int, loss_scale: float | None) -> dict[str, Any]:
        """All-reduce the sums since the last write (a collective) and log them on rank 0."""
        sums, counts, correct = all_reduce_sum(self.sums)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "step": progress.step,
            "loss": (sums.sum() / counts.sum().clamp(min=1)).item(),
            **{f"loss_q{q}": (sums[q] / counts[q]).item() for q in range(4) if counts[q] > 0},
            "lr": lr,
            "samples_seen": progress.samples_seen,
            "skipped_steps": progress.skipped_steps,
            "samples_per_s": self.steps * samples_per_step / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_fraction": self.data_wait / elapsed,
        }
        if self.accuracy:
            record["accuracy"] = (correct.sum() / counts.sum().clamp(min=1)).item()
            record.update({f"accuracy_q{q}": (correct[q] / counts[q]).item() for q in range(4) if counts[q] > 0})
        if self.grad_norms:
            record["grad_norm"] = (self.grad_norm_sum / self.grad_norms).item()
        if loss_scale is not None:
            record["loss_scale"] = float(loss_scale)
        if self.rank == 0:
            record.update(system_metrics(self.device))
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.reset()
        return record


class Reports:
    """The periodic reports of a run: metric logs every tracking.log_every steps, EMA sample grids every
    tracking.sample_every and the FID every eval.every (diffusion models), at step boundaries."""

    def __init__(
        self,
        config: Config,
        process: ProcessInfo,
        export: ExportInfo,
        tracker: Tracker,
        metrics: MetricsLog,
        ema: EMA,
        features: FeatureNet | None,
        device: torch.device,
        generates: bool,
        data: LatentLoader,
    ) -> None:
        self.config, self.tracker, self.metrics, self.ema = config, tracker, metrics, ema
        self.rank, self.run_dir = process.rank, Path(config.run.dir)
        self.grids = bool(config.tracking.sample_every) and generates
        self.grid = _grid_sampler(export, config, device, data) if self.rank == 0 and self.grids else None
        self.fid = _training_fid(config, export, features, process, device, data) if features and generates else None

    def after_step(self, progress: Progress, lr: float, loss_scale: float | None) -> None:
        """Whatever is due at this step (the due ones are collectives: every rank calls this)."""
        config, step = self.config, progress.step
        if step % config.tracking.log_every == 0 or step == config.train.max_steps:
            record = self.metrics.write(progress, lr, config.train.global_batch_size, loss_scale)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step)
            if self.rank == 0:
                log.info("step %d loss %.4f (%.0f samples/s)", step, record["loss"], record["samples_per_s"])
        if self.grids and step % config.tracking.sample_every == 0:
            with self.metrics.paused():
                self._sample_grid(step)
        if self.fid is not None and step % config.eval.every == 0:
            with self.metrics.paused():
                self._evaluate_fid(step)

    def after_save(self) -> None:
        """Rank 0 draws the training curves so far into run.dir/plots/ and logs them to MLflow."""
        if self.rank != 0:
            return
        try:
            written = plot_training_curves(self.metrics.path, self.run_dir / "plots")
        except Exception as e:  # noqa: BLE001 - a plot must never stop training (disk full, matplotlib)
            log.warning("no training-curve plots: %s", e)
            return
        if written:
            self.tracker.log_artifacts(self.run_dir / "plots", "plots")

    def _sample_grid(self, step: int) -> None:
        """A guided grid of the EMA weights into run.dir/samples/ and MLflow (a collective under ZeRO-3)."""
        weights = self.ema.full_state_dict() if self.ema.partitioned or self.rank == 0 else None
        if self.grid is None:
            return
        started = time.perf_counter()
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        try:
            image = self.grid(weights)
            save_png(path, image)
        except Exception as e:  # noqa: BLE001 - a grid must never stop training (out of memory, disk full)
            log.warning("step %d: no sample grid: %s", step, e)
            return
        self.tracker.log_image(image, "samples", step)
        log.info("step %d: sample grid %s (%.1f s)", step, path, time.perf_counter() - started)

    def _evaluate_fid(self, step: int) -> None:
        """FID of the EMA weights at this step into metrics.jsonl and MLflow (a collective: every rank samples)."""
        started = time.perf_counter()
        result = self.fid(self.ema.full_state_dict())
        if self.rank == 0:
            result["eval_time_s"] = time.perf_counter() - started
            with self.metrics.path.open("a") as f:
                f.write(json.dumps({"step": step, **result}) + "\n")
            self.tracker.log_metrics(result, step)
            log.info("step %d: FID %.2f (%.1f s)", step, result["fid"], result["eval_time_s"])


def start_tracking(
    config: Config, process: ProcessInfo, data: LatentLoader, num_parameters: int, resumed: dict[str, Any] | None
) -> Tracker:
    """Rank 0's MLflow run: the checkpoint's run when resuming, else a new one; a no-op elsewhere."""
    resumed = resumed or {}
    run_id = resumed.get("run_id")
    run_key = resumed.get("run_key") or uuid.uuid4().hex  # os.urandom: leaves the training RNG alone
    restarts = resumed["restarts"] + 1 if resumed else 0
    if process.rank != 0 or not config.tracking.enabled:
        return Tracker.disabled(run_id, run_key, restarts)

    manifest, commit = data.manifest, code_version()
    extra = {
        "model.num_parameters": num_parameters,
        "dataset.codec": manifest["codec"]["name"],
        "dataset.latent_shape": "x".join(map(str, data.latent_shape)),
        "dataset.num_samples": manifest["num_samples"],
        "world_size": process.world_size,
        "version.torch": torch.__version__,
        "version.deepspeed": deepspeed_version(),
        "version.code": commit or "unknown",
    }
    tags = {"run_dir": str(Path(config.run.dir).resolve()), "mlflow.source.name": "launch.train"}
    if commit:
        tags["mlflow.source.git.commit"] = commit.removesuffix("+dirty")
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    uri = tracking_uri(config)
    local_uri, local_artifacts = local_store(config.run.dir)
    return Tracker(
        uri,
        config.tracking.experiment,
        config.run.name or Path(config.run.dir).resolve().name,
        run_id=run_id,
        run_key=run_key,
        restarts=restarts,
        params=run_params(config, extra),
        tags=tags,
        config_yaml=to_yaml(config),
        artifact_root=local_artifacts if uri == local_uri else None,
        max_pending=config.tracking.max_pending,
    )


def _grid_sampler(export: ExportInfo, config: Config, device: torch.device, data: LatentLoader) -> SampleGrid | None:
    """Rank 0's grid maker: a row per class, or for a text model per prompt (tracking.prompts, else
    the captions the dataset keeps as examples)."""
    try:
        if not config.model.text:
            return SampleGrid(export, device, seed=config.run.seed)
        prompts = config.tracking.prompts or data.manifest["text"].get("examples")
        if not prompts:
            log.warning("sample grids disabled: set tracking.prompts (the dataset records no example captions)")
            return None
        return SampleGrid(export, device, seed=config.run.seed, prompts=prompts, null_text=data.null_text)
    except Exception as e:  # noqa: BLE001 - e.g. the VAE cannot be loaded offline: train without grids
        log.warning("sample grids disabled: %s", e)
        return None


def _training_fid(
    config: Config,
    export: ExportInfo,
    features: FeatureNet,
    process: ProcessInfo,
    device: torch.device,
    data: LatentLoader,
) -> TrainingFid:
    """The in-training FID with reference statistics computed once (cached in run.dir/eval)."""
    evaluation = config.eval
    reference = evaluation.reference or config.data.url
    cache = Path(config.run.dir) / "eval" / "reference-stats.npz"
    started = time.perf_counter()
    stats = reference_statistics(
        reference,
        features,
        limit=evaluation.reference_samples,
        batch_size=evaluation.batch_size,
        rank=process.rank,
        world_size=process.world_size,
        device=device,
        storage_options=config.data.storage_options,
        cache=cache,
        resolution=image_resolution(export.codec, list(export.latent_shape)),
    )
    if process.rank == 0:
        log.info(
            "FID reference: %d samples of %s (%.1f s)",
            stats["num_samples"],
            redact_url(reference),
            time.perf_counter() - started,
        )
    return TrainingFid(
        export,
        features,
        stats,
        Guidance(evaluation.cfg_scale),
        num_samples=evaluation.num_samples,
        steps=evaluation.sample_steps,
        sampler=evaluation.sampler,
        batch_size=evaluation.batch_size,
        seed=config.run.seed,
        rank=process.rank,
        world_size=process.world_size,
        device=device,
        prompts=_fid_prompts(config),
        null_text=data.null_text,
    )


def _fid_prompts(config: Config) -> list[str] | None:
    """A text model's in-training FID prompts: the reference's first captions, as launch.evaluate takes
    them by default (text-to-image FID's protocol: COCO's captions against COCO's images), or the
    training data's when the reference holds none (statistics, an image folder). None for other models."""
    if not config.model.text:
        return None
    options, reference = config.data.storage_options, config.eval.reference or config.data.url
    try:
        captioned = bool(load_manifest(reference, options).get("text"))
    except DatasetError:  # no manifest: statistics or an image folder
        captioned = False
    return dataset_captions(reference if captioned else config.data.url, config.eval.num_samples, options)
