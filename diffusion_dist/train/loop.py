"""The training loop: one function, phases marked, small stateful helpers around it."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from ..config import Config, to_yaml
from ..data.manifest import DatasetError
from ..data.storage import redact_url
from ..data.stream import LatentLoader
from ..distributed import ProcessInfo, barrier, init_process_group
from ..evaluation import FeatureNet
from ..export import ExportInfo, write_export
from ..objectives import OBJECTIVES, Objective
from .checkpoint import TrainingAborted, TrainState
from .ema import EMA
from .engine import Engine
from .preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from .reporting import MetricsLog, Reports, start_tracking
from .watchdog import Watchdog

log = logging.getLogger("diffusion_dist.train")

__all__ = ["REQUEUE_EXIT_CODE", "TrainingAborted", "train"]


def train(config: Config, process: ProcessInfo, resume: str | None = None, fresh: bool = False) -> int:
    """Train to config.train.max_steps; returns 0, or REQUEUE_EXIT_CODE after a preemption save."""
    # Set up processes, seeds, data, model, engine.
    preemption = PreemptionFlag(config.run.preempt_signals)  # first: a signal during start-up must not kill us
    device = training_device(process)
    init_process_group(process, device, config.run.collective_timeout_s)
    watchdog = Watchdog(process.rank, process.world_size, config.run.heartbeat_timeout_s)  # ends us if a rank fails
    rank, world = process.rank, process.world_size
    # The FID network first: missing weights must stop the job before any work.
    features = None
    if config.eval.every:
        weights = config.eval.feature_weights or None
        features = FeatureNet(config.eval.feature_extractor, weights, device, weights_flag="eval.feature_weights")
    run_dir = Path(config.run.dir)
    if rank == 0:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
    rank_seed = config.run.seed * world + rank  # per-rank seed (docs/architecture.md, "Randomness and determinism")
    random.seed(rank_seed)
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank

    objective = OBJECTIVES[config.model.kind].from_config(config)
    data = LatentLoader(
        config.data.url,
        batch_size=config.train.micro_batch_size,
        null_label=config.model.num_classes,
        global_batch=config.train.global_batch_size,
        draws=objective.draw,  # each sample's loss draws, keyed to its global index: the same on any rank
        rank=rank,
        world_size=world,
        num_workers=config.data.num_workers,
        seed=config.run.seed,
        shuffle_shards=config.data.shuffle_shards,
        strict=config.data.strict,
        storage_options=config.data.storage_options,
        pin_memory=device.type == "cuda",
        stop=lambda: preemption.raised,  # reads stuck on storage give up, so the rank can reach its save
        text=config.model.text,
    )
    _check_labels(config, data.manifest, objective)
    model = objective.build(
        config.model.size,
        data.latent_shape[0],
        config.model.num_classes,
        learn_sigma=objective.diffusion.learn_sigma,
        dropout=config.model.dropout,
        gradient_checkpointing=config.model.gradient_checkpointing,
        text_encoder=data.manifest["text"]["encoder"] if config.model.text else None,
    )
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = Engine(model, config, world, device)
    torch.manual_seed(rank_seed)  # dropout and other global draws differ per rank from here on
    ema = EMA(engine.local_parameters, config.train.ema_decay, config.train.ema_warmup, engine.partitioned)
    export = ExportInfo.from_config(config, data.manifest, data.latent_shape)
    state = TrainState(config, engine, ema, data, export, rank, world)
    state.resume(resume, fresh)
    tracker = start_tracking(config, process, data, num_parameters, state.resumed_tracking)
    state.tracker = tracker
    metrics = MetricsLog(run_dir, rank, objective.diffusion.num_timesteps, device, accuracy=not objective.generates)
    reports = Reports(config, process, export, tracker, metrics, ema, features, device, objective.generates, data)

    # NHWC inputs: convolutions follow their input's layout where their kernels allow (whether
    # the GroupNorms keep it differs by device: measure with benchmarks/gpu_throughput.py).
    layout = torch.channels_last if config.train.channels_last else torch.contiguous_format

    def network(z: torch.Tensor, *conditions: torch.Tensor, **text: torch.Tensor) -> torch.Tensor:
        # Text embeddings arrive in bf16 (as stored); the engine's forward takes its input dtype.
        text = {k: v.to(engine.input_dtype) if v.is_floating_point() else v for k, v in text.items()}
        return engine(z.to(engine.input_dtype, memory_format=layout), *conditions, **text).float()

    keys_log = (run_dir / "logs" / f"keys-rank{rank}.txt").open("a") if config.run.log_sample_keys else None
    batches = iter(data)
    progress = state.progress
    try:
        while progress.step < config.train.max_steps:
            # Accumulate gradients over micro batches, then step the optimizer.
            for _ in range(engine.accumulation):
                batch = metrics.next_batch(batches)
                # The loss's draws (t, ε, ξ, label dropout) come with the batch, keyed to each sample's
                # global index: one rank accumulating two micro batches computes exactly what two ranks do.
                latents = batch.latents.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                draws = {name: value.to(device, non_blocking=True) for name, value in batch.draws.items()}
                text = {k: v.to(device, non_blocking=True) for k, v in batch.text.items()} if batch.text else None
                terms = objective.loss(network, latents, labels, draws, text)
                engine.backward(objective.total(terms))
                metrics.add(terms)
                if keys_log:
                    keys_log.write("".join(f"{progress.step + 1}\t{key}\n" for key in batch.keys))
            update = engine.step()

            # Count skipped steps; update the EMA after real ones.
            progress.step += 1
            progress.samples_seen += config.train.global_batch_size
            if update.applied:
                progress.consecutive_skips = 0
                ema.update()
            else:
                progress.skipped_steps += 1
                progress.consecutive_skips += 1
                if progress.consecutive_skips >= config.train.max_skipped_steps:
                    raise TrainingAborted(
                        f"{progress.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                        f"(at step {progress.step}); check the data (inspect_shards) and lower train.lr"
                    )
            metrics.end_step(update.grad_norm)

            # Log, sample, checkpoint, and stop for preemption: at step boundaries, on all ranks together.
            reports.after_step(progress, engine.lr, engine.loss_scale)
            if keys_log:
                keys_log.flush()
            preempted = preemption.agreed()
            if preempted or progress.step % config.checkpoint.every == 0 or progress.step == config.train.max_steps:
                if preempted:
                    preemption.close()
                with metrics.paused():
                    state.save()
                    reports.after_save()
            if preempted:
                if rank == 0:
                    log.info("preempted: saved step %d, exiting with %d (requeue)", progress.step, REQUEUE_EXIT_CODE)
                tracker.close("KILLED", min(10.0, config.tracking.flush_timeout))  # before SLURM's KillWait ends
                barrier()  # ranks end together: launchers end the others when the first one exits
                watchdog.close()
                return REQUEUE_EXIT_CODE

        # The final state in this run's store (unless resumed from it there), and the export.
        if state.saved_step != progress.step:
            state.save()
        weights, raw = ema.full_state_dict(), engine.full_weights()
        if rank == 0:
            tracking = {"experiment": config.tracking.experiment, "run_id": tracker.run_id} if tracker.run_id else None
            # launch.evaluate logs its results as a child of the training run the export names.
            info = export.replace(step=progress.step, tracking=tracking)
            directory = write_export(
                run_dir / "export", weights, info, raw, data.null_text if config.model.text else None
            )
            tracker.log_artifacts(directory, "export")
            log.info("done: %d steps; export in %s", progress.step, directory)
        preemption.close()
        tracker.close("FINISHED", config.tracking.flush_timeout)
        barrier()  # ranks end together: launchers end the others when the first one exits
        watchdog.close()
        return 0
    except BaseException as error:
        watchdog.fail(error)  # first: the other ranks are blocked in a collective until they hear of it
        tracker.close("FAILED", min(10.0, config.tracking.flush_timeout))
        raise


def training_device(process: ProcessInfo) -> torch.device:
    """This rank's GPU (made current), or the CPU. srun may bind one GPU per task, so that every task
    sees device 0: the local rank wraps around the visible devices."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", process.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest convolutions
    return device


def _check_labels(config: Config, manifest: dict, objective: Objective) -> None:
    """A classifier needs labels (LatentLoader checks that a conditional model has room for them)."""
    if not objective.generates and not (manifest.get("labels") or {}).get("labelled"):
        raise DatasetError(
            f"data.url={redact_url(config.data.url)}: a classifier (model.kind=classifier) needs labelled data"
        )
