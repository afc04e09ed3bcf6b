"""The training loop: one function, phases marked, small stateful helpers around it."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from ..config import Config, to_dict, to_yaml
from ..data.manifest import DatasetError
from ..data.storage import redact_url
from ..data.stream import LatentLoader
from ..diffusion import GaussianDiffusion, classifier_loss, diffusion_loss, timestep_quartile_sums
from ..distributed import ProcessInfo, init_process_group
from ..evaluation import FeatureNet, TrainingFid, image_resolution, reference_statistics
from ..inference import Guidance, SampleGrid
from ..models import build_classifier, build_unet
from .checkpoint import SHARED, Checkpointer, committed_checkpoints, load_state
from .ema import EMA
from .engine import build_engine, clip_gradients, input_dtype
from .export import write_export
from .tracking import Tracker, code_version, local_store, run_params, system_metrics, tracking_uri

log = logging.getLogger("diffusion_dist.train")

# Exit code after a preemption save: "requeue me" to slurm/train.sh and launch.submit (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


class TrainingAborted(RuntimeError):
    """Training cannot go on (too many non-finite steps, a checkpoint from another model)."""


@dataclass
class Progress:
    """What the step loop has done, saved in every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


class PreemptionFlag:
    """Signals only set a flag; the loop saves and exits at a step boundary, on all ranks together.

    `received` (names, for the whole process) lets a launcher tell a time-limit warning it should
    requeue after (launch.submit: SIGUSR2) from a cancellation (SIGTERM).
    """

    received: set[str] = set()

    def __init__(self, names: list[str]) -> None:
        self.raised = False
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True
        PreemptionFlag.received.add(signal.Signals(signum).name)

    def agreed(self) -> bool:
        """True on every rank, at the same call, once any rank was signalled (a collective).

        Each call returns the verdict of the previous call's all-reduce, which ran in the
        background on a CPU (gloo) group: asking every step never waits for the GPU to drain its
        queue nor for the network. A signal is acted on one or two steps after it came.
        """
        verdict = self._collect()
        if self._group is None:
            self._group = dist.new_group(backend="gloo")  # a collective: all ranks come here after their first step
        flag = torch.tensor([1.0 if self.raised else 0.0])
        self._pending = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag
        return verdict

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        return bool(flag.item())

    def close(self) -> None:
        """Wait for the last all-reduce, so no rank leaves one in flight."""
        self._collect()


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
        totals = self.sums.clone()
        dist.all_reduce(totals)
        sums, counts, correct = totals
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


def train(config: Config, process: ProcessInfo, resume: str | None = None, fresh: bool = False) -> int:
    """Train to config.train.max_steps; returns 0, or REQUEUE_EXIT_CODE after a preemption save."""
    # Set up processes, seeds, data, model, engine.
    preemption = PreemptionFlag(config.run.preempt_signals)  # first: a signal during start-up must not kill us
    # srun may bind one GPU per task (then every task sees device 0): wrap the local rank.
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{process.local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(process, device)
    rank, world = process.rank, process.world_size
    evaluation = config.eval
    # The FID network first: missing weights must stop the job before any work.
    weights = evaluation.feature_weights or None
    features = (
        FeatureNet(evaluation.feature_extractor, weights, device, weights_flag="eval.feature_weights")
        if evaluation.every
        else None
    )
    run_dir = Path(config.run.dir)
    if rank == 0:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
    rank_seed = config.run.seed * world + rank  # DESIGN.md: per-rank seed
    random.seed(rank_seed)
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank

    data = LatentLoader(
        config.data.url,
        batch_size=config.train.micro_batch_size,
        null_label=config.model.num_classes,
        rank=rank,
        world_size=world,
        num_workers=config.data.num_workers,
        seed=config.run.seed,
        shuffle_shards=config.data.shuffle_shards,
        strict=config.data.strict,
        storage_options=config.data.storage_options,
        pin_memory=device.type == "cuda",
    )
    diffusion = GaussianDiffusion.from_schedule(
        config.diffusion.schedule, config.diffusion.num_timesteps, config.diffusion.variance
    )
    _check_labels(config, data.manifest)
    is_classifier = config.model.kind == "classifier"
    if is_classifier:
        model = build_classifier(
            config.model.size,
            data.latent_shape[0],
            config.model.num_classes,
            dropout=config.model.dropout,
            gradient_checkpointing=config.model.gradient_checkpointing,
        )
    else:
        model = build_unet(
            config.model.size,
            data.latent_shape[0],
            config.model.num_classes,
            learn_sigma=diffusion.learn_sigma,
            dropout=config.model.dropout,
            gradient_checkpointing=config.model.gradient_checkpointing,
        )
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = build_engine(model, config, world, device)
    torch.manual_seed(rank_seed)  # dropout and other global draws differ per rank from here on
    dtype = input_dtype(config)
    ema = EMA(engine.module, config.train.ema_decay, config.train.ema_warmup)
    checkpointer = Checkpointer(run_dir, config.checkpoint.keep, rank)
    progress = Progress()
    saved_step = -1  # the step of the newest checkpoint on disk for this run
    export_info = _export_info(config, data)
    tracking_state: dict[str, Any] | None = None  # the MLflow run of the checkpoint resumed from

    # Resume from the newest committed checkpoint (or the one asked for), chosen on rank 0 and
    # loaded by all ranks together: ranks must never continue from different checkpoints.
    if fresh:
        checkpointer.set_aside()
    candidates = [Path(resume)] if resume else ([] if fresh else _broadcast(committed_checkpoints(checkpointer.root)))
    for directory in candidates:
        try:
            shared = load_state(directory / SHARED)
            per_rank = checkpointer.load_rank_state(directory)
            ok = True
        except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
            log.warning("cannot read checkpoint %s (%s)", directory, e)
            ok = False
        if not _all_ranks(ok, device):
            if resume:
                raise TrainingAborted(f"checkpoint {resume} cannot be read on every rank (see warnings)")
            continue
        if {"kind": "unet", **shared["config"]["model"]} != to_dict(config)["model"]:  # kind: added later
            raise TrainingAborted(
                f"checkpoint {directory} was made by another model ({shared['config']['model']}); "
                "use a new run.dir, or --no-resume to start over"
            )
        checkpointer.load_engine(engine, directory)
        progress = Progress(**shared["progress"])
        data.load_state_dict(per_rank["data"])
        ema.load_state_dict(per_rank["ema"] if ema.partitioned else shared["ema"])
        torch.set_rng_state(per_rank["rng"]["torch"])
        random.setstate(_python_rng_state(per_rank["rng"]["python"]))
        if device.type == "cuda" and "cuda" in per_rank["rng"]:
            torch.cuda.set_rng_state(per_rank["rng"]["cuda"])
        saved_step = progress.step
        tracking_state = shared.get("tracking") or {"restarts": 0}
        if rank == 0:
            log.info("resumed from %s at step %d", directory, progress.step)
        break
    else:
        if candidates:
            raise TrainingAborted(
                f"no checkpoint in {checkpointer.root} could be loaded (see warnings); --no-resume starts over"
            )

    tracker = _start_tracking(config, process, data, num_parameters, tracking_state)
    grids = config.tracking.sample_every and not is_classifier
    grid = _grid_sampler(export_info, config, device) if rank == 0 and grids else None
    fid = _training_fid(config, export_info, features, process, device) if features else None

    # NHWC inputs: convolutions follow their input's layout where their kernels allow (whether
    # the GroupNorms keep it differs by device: measure with benchmarks/gpu_throughput.py).
    layout = torch.channels_last if config.train.channels_last else torch.contiguous_format

    def model_fn(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return engine(z.to(dtype, memory_format=layout), t, labels).float()

    def classifier_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return engine(z.to(dtype, memory_format=layout), t).float()

    def save() -> None:
        nonlocal saved_step
        shared = {
            "progress": asdict(progress),
            "config": to_dict(config),
            "tracking": tracker.state_dict(),
            "export": export_info,
            "ema_layout": ema.layout(),
        }
        if not ema.partitioned:
            shared["ema"] = ema.state_dict()
        per_rank = {
            "data": data.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": _python_rng_tensor(random.getstate()),
                **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
            },
            **({"ema": ema.state_dict()} if ema.partitioned else {}),
        }
        directory = checkpointer.save(engine, progress.step, shared, per_rank)
        saved_step = progress.step
        if rank == 0:
            log.info("step %d: checkpoint %s", progress.step, directory)

    metrics = MetricsLog(run_dir, rank, diffusion.num_timesteps, device, accuracy=is_classifier)
    keys_log = (run_dir / "logs" / f"keys-rank{rank}.txt").open("a") if config.run.log_sample_keys else None
    batches = iter(data)
    accumulation = engine.gradient_accumulation_steps()
    stage_zero = config.train.zero_stage == 0

    def loss_scale() -> float | None:
        return engine.optimizer.cur_scale if config.train.precision == "fp16" else None

    try:
        while progress.step < config.train.max_steps:
            # Accumulate gradients over micro-batches; DeepSpeed steps the optimizer on the last.
            skipped_before = engine.skipped_steps
            non_finite, grad_norm = False, None
            for micro in range(accumulation):
                waited = time.perf_counter()
                batch = next(batches)
                metrics.data_wait += time.perf_counter() - waited
                latents = batch.latents.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                # The loss's draws (t, ε, ξ, label dropout) are keyed to the batch, not the rank:
                # one rank accumulating two batches computes exactly what two ranks do.
                generator = torch.Generator(device).manual_seed(batch.seed)
                if is_classifier:
                    terms = classifier_loss(
                        classifier_fn,
                        diffusion,
                        latents,
                        labels,
                        null_label=config.model.num_classes,
                        generator=generator,
                    )
                else:
                    terms = diffusion_loss(
                        model_fn,
                        diffusion,
                        latents,
                        labels,
                        null_label=config.model.num_classes,
                        p_uncond=config.diffusion.p_uncond,
                        input_perturbation=config.diffusion.input_perturbation,
                        vlb_weight=config.diffusion.vlb_weight,
                        generator=generator,
                    )
                if is_classifier:  # the mean over labelled samples (unlabelled ones weigh 0)
                    engine.backward(terms["loss"].sum() / terms["labelled"].sum().clamp(min=1))
                else:
                    engine.backward(terms["loss"].mean())
                if stage_zero and micro == accumulation - 1:
                    # Without ZeRO, DeepSpeed applies non-finite gradients; they are already
                    # all-reduced here, so every rank sees the same verdict and skips together.
                    grad_norm = clip_gradients(engine.module, config.train.grad_clip)
                    non_finite = not torch.isfinite(grad_norm).item()
                if non_finite:
                    with _optimizer_step_skipped(engine):
                        engine.step()
                else:
                    engine.step()
                metrics.add(terms)
                if keys_log:
                    keys_log.write("".join(f"{progress.step + 1}\t{key}\n" for key in batch.keys))

            # Count skipped steps; update the EMA after real ones.
            skipped = non_finite or engine.skipped_steps > skipped_before
            progress.step += 1
            progress.samples_seen += config.train.global_batch_size
            if skipped:
                progress.skipped_steps += 1
                progress.consecutive_skips += 1
                if progress.consecutive_skips >= config.train.max_skipped_steps:
                    raise TrainingAborted(
                        f"{progress.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                        f"(at step {progress.step}); check the data (inspect_shards) and lower train.lr"
                    )
            else:
                progress.consecutive_skips = 0
                ema.update()
            metrics.end_step(None if skipped else grad_norm if stage_zero else engine.get_global_grad_norm())

            # Log, sample, checkpoint, and stop for preemption: at step boundaries, on all ranks together.
            if progress.step % config.tracking.log_every == 0 or progress.step == config.train.max_steps:
                record = metrics.write(progress, engine.get_lr()[0], config.train.global_batch_size, loss_scale())
                step = record.pop("step")
                tracker.log_metrics(record, step)
                if rank == 0:
                    log.info("step %d loss %.4f (%.0f samples/s)", step, record["loss"], record["samples_per_s"])
            if grids and progress.step % config.tracking.sample_every == 0:
                with metrics.paused():
                    _sample_grid(grid, ema, tracker, run_dir, progress.step, rank)
            if fid is not None and progress.step % config.eval.every == 0:
                with metrics.paused():
                    _evaluate_fid(fid, ema, tracker, metrics.path, progress.step, rank)
            if keys_log:
                keys_log.flush()
            if preemption.agreed():
                preemption.close()
                save()
                if rank == 0:
                    log.info("preempted: saved step %d, exiting with %d (requeue)", progress.step, REQUEUE_EXIT_CODE)
                tracker.close("KILLED", min(10.0, config.tracking.flush_timeout))  # before SLURM's KillWait ends
                dist.barrier()  # ranks end together: launchers end the others when the first one exits
                return REQUEUE_EXIT_CODE
            if progress.step % config.checkpoint.every == 0 and progress.step < config.train.max_steps:
                with metrics.paused():
                    save()

        # Save the final state (unless resumed from it) and the export.
        if saved_step != progress.step:
            save()
        weights, raw = ema.full_state_dict(), _full_weights(engine.module)
        if rank == 0:
            info = {**export_info, "step": progress.step}
            if tracker.run_id:  # launch.evaluate logs its results as a child of this run
                info["tracking"] = {"experiment": config.tracking.experiment, "run_id": tracker.run_id}
            directory = write_export(run_dir / "export", weights, info, raw=raw)
            tracker.log_artifacts(directory, "export")
            log.info("done: %d steps; export in %s", progress.step, directory)
        preemption.close()
        tracker.close("FINISHED", config.tracking.flush_timeout)
        dist.barrier()  # ranks end together: launchers end the others when the first one exits
        return 0
    except BaseException:
        tracker.close("FAILED", min(10.0, config.tracking.flush_timeout))
        raise


def _check_labels(config: Config, manifest: dict[str, Any]) -> None:
    """A classifier needs labels (LatentLoader checks that a conditional model has room for them)."""
    if config.model.kind == "classifier" and not (manifest.get("labels") or {}).get("labelled"):
        raise DatasetError(
            f"data.url={redact_url(config.data.url)}: a classifier (model.kind=classifier) needs labelled data"
        )


def _broadcast(checkpoints: list[Path]) -> list[Path]:
    """Rank 0's list of checkpoints on every rank."""
    box = [checkpoints]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ranks(ok: bool, device: torch.device) -> bool:
    """True on every rank if it is true on every rank (a collective)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained (not averaged) weights in fp32, gathered from all ranks under ZeRO-3 (a collective)."""
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().float().clone() for name, p in params.items()}


def _start_tracking(
    config: Config, process: ProcessInfo, data: LatentLoader, num_parameters: int, resumed: dict[str, Any] | None
) -> Tracker:
    """Rank 0's MLflow run: the checkpoint's run when resuming, else a new one; a no-op elsewhere."""
    resumed = resumed or {}
    run_id = resumed.get("run_id")
    run_key = resumed.get("run_key") or uuid.uuid4().hex  # os.urandom: leaves the training RNG alone
    restarts = resumed["restarts"] + 1 if resumed else 0
    if process.rank != 0 or not config.tracking.enabled:
        return Tracker.disabled(run_id, run_key, restarts)
    import deepspeed

    manifest, commit = data.manifest, code_version()
    extra = {
        "model.num_parameters": num_parameters,
        "dataset.codec": manifest["codec"]["name"],
        "dataset.latent_shape": "x".join(map(str, data.latent_shape)),
        "dataset.num_samples": manifest["num_samples"],
        "world_size": process.world_size,
        "version.torch": torch.__version__,
        "version.deepspeed": deepspeed.__version__,
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


def _grid_sampler(export_info: dict[str, Any], config: Config, device: torch.device) -> SampleGrid | None:
    try:
        return SampleGrid(export_info, device, seed=config.run.seed)
    except Exception as e:  # noqa: BLE001 - e.g. the VAE cannot be loaded offline: train without grids
        log.warning("sample grids disabled: %s", e)
        return None


def _training_fid(
    config: Config, export_info: dict[str, Any], features: FeatureNet, process: ProcessInfo, device: torch.device
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
        resolution=image_resolution(export_info["codec"], export_info["latent_shape"]),
    )
    if process.rank == 0:
        log.info(
            "FID reference: %d samples of %s (%.1f s)",
            stats["num_samples"],
            redact_url(reference),
            time.perf_counter() - started,
        )
    return TrainingFid(
        export_info,
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
    )


def _evaluate_fid(fid: TrainingFid, ema: EMA, tracker: Tracker, metrics_path: Path, step: int, rank: int) -> None:
    """FID of the EMA weights at this step into metrics.jsonl and MLflow (a collective: every rank samples)."""
    started = time.perf_counter()
    result = fid(ema.full_state_dict())
    if rank == 0:
        result["eval_time_s"] = time.perf_counter() - started
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        tracker.log_metrics(result, step)
        log.info("step %d: FID %.2f (%.1f s)", step, result["fid"], result["eval_time_s"])


def _sample_grid(grid: SampleGrid | None, ema: EMA, tracker: Tracker, run_dir: Path, step: int, rank: int) -> None:
    """A guided grid from the EMA weights into run.dir/samples/ and MLflow (gathering is a collective under ZeRO-3)."""
    weights = ema.full_state_dict() if ema.partitioned or rank == 0 else None
    if grid is None:
        return
    started = time.perf_counter()
    path = run_dir / "samples" / f"step-{step:07d}.png"
    try:
        image = grid(weights)
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
    except Exception as e:  # noqa: BLE001 - a grid must never stop training (out of memory, disk full)
        log.warning("step %d: no sample grid: %s", step, e)
        return
    tracker.log_image(image, "samples", step)
    log.info("step %d: sample grid %s (%.1f s)", step, path, time.perf_counter() - started)


@contextmanager
def _optimizer_step_skipped(engine):
    """engine.step() with the optimizer's update suppressed and gradients zeroed: DeepSpeed still
    advances its micro-step counters, and clipping sees finite (zero) gradients."""
    optimizer = engine.optimizer
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method
    try:
        yield
    finally:
        del optimizer.step


def _python_rng_tensor(state: tuple) -> dict[str, Any]:
    """random.getstate() as tensors and ints, so the checkpoint loads with weights_only=True."""
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_state(saved: dict[str, Any]) -> tuple:
    return saved["version"], tuple(int(x) for x in saved["internal"].tolist()), saved["gauss"]


def _export_info(config: Config, data: LatentLoader) -> dict[str, Any]:
    """What an export needs to rebuild the model and decode its samples."""
    manifest = data.manifest
    return {
        "model": {
            "kind": config.model.kind,
            "size": config.model.size,
            "in_channels": data.latent_shape[0],
            "num_classes": config.model.num_classes,
        },
        "diffusion": {
            k: getattr(config.diffusion, k)
            for k in ("schedule", "num_timesteps", "variance", "sampler", "sample_steps", "guidance_scale")
        },
        "codec": manifest["codec"],
        "latent_shape": list(data.latent_shape),
        "dataset": {
            "url": redact_url(config.data.url),
            "num_samples": manifest["num_samples"],
            "class_names": (manifest.get("labels") or {}).get("class_names"),
        },
    }
