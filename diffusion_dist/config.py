"""The typed config tree: one YAML per experiment, `section.key=value` overrides, validation.

Every key has a type and a comment here; configs/*.yaml set only what differs from these
defaults. Everything is checked before any process group starts, and every error names
the key at fault.
"""

from __future__ import annotations

import difflib
import math
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .codecs import PRECISIONS
from .data.storage import redact_text
from .diffusion import SAMPLERS, SCHEDULES, VARIANCES
from .models import MODEL_KINDS, UNET_SIZES

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class RunConfig:
    dir: str = "runs/default"  # all outputs: checkpoints/, export/, config.yaml, logs
    seed: int = 0  # global seed; rank r uses seed · world_size + r
    name: str = ""  # display name (MLflow run name); empty: the basename of dir
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])  # save, exit 75 (requeue)
    log_sample_keys: bool = False  # write each rank's consumed sample keys to run.dir/logs (audits, tests)
    # Seconds a collective may wait for the slowest rank before it fails: long enough for every
    # rank to wait at a barrier while another saves a large model's checkpoint to slow storage.
    collective_timeout_s: float = 1800.0
    # Seconds without a heartbeat from another rank (a frozen or unreachable process) before every
    # rank stops with exit code 1 (train/watchdog.py; multi-rank runs only). A rank that raises or
    # dies is noticed within seconds regardless.
    heartbeat_timeout_s: float = 60.0


@dataclass
class ModelConfig:
    kind: str = "unet"  # unet: the diffusion model | classifier: p(c | z_t, t) for classifier guidance
    size: str = "UNet-B"  # a named size of models.UNET_SIZES (a classifier is the encoder half of that size)
    num_classes: int = 1000  # labels 0..num_classes−1; index num_classes is the null token ∅
    dropout: float = 0.0
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    text: bool = False  # condition on the dataset's caption embeddings (cross-attention + pooled vector), too


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear (DDPM) | cosine (improved DDPM) | scaled_linear (LDM)
    num_timesteps: int = 1000  # T of the training chain
    variance: str = "learned_range"  # fixed_small | fixed_large | learned_range (learn_sigma)
    input_perturbation: float = 0.1  # γ of DDPM-IP; 0 is the plain loss
    p_uncond: float = 0.1  # probability of replacing a label by ∅ (classifier-free guidance)
    vlb_weight: float = 0.001  # λ of the hybrid loss L_simple + λ·L_vlb (learned variance only)
    sampler: str = "ddpm"  # ddpm | ddim, for sample grids and launch.sample
    sample_steps: int = 250  # respaced chain length for sampling
    guidance_scale: float = 4.0  # w of ε̃ = (1 + w)·ε_c − w·ε_∅ for sample grids; DiT's/diffusers' s = 1 + w


@dataclass
class DataConfig:
    url: str = ""  # dataset prefix holding manifest.json and shards: path, file://, s3://bucket/prefix
    num_workers: int = 4  # DataLoader workers per rank; each reads its own shards
    shuffle_shards: int = 4  # shards read and shuffled together by a worker (memory: this many shards)
    strict: bool = False  # fail on a missing or corrupt shard instead of skipping it with a warning
    allow_batch_change: bool = False  # resume with another train.global_batch_size: skips the rest of the epoch
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options; secrets never logged


@dataclass
class TrainConfig:
    max_steps: int = 400_000  # optimizer steps
    global_batch_size: int = 256  # samples per optimizer step over all ranks
    micro_batch_size: int = 32  # samples per forward per rank; accumulation fills the rest
    precision: str = "bf16"  # fp32 | bf16 (autocast over fp32 parameters) | fp16 (fp16 weights, dynamic loss scaling)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0–3
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup from 0, then lr_schedule
    lr_schedule: str = "constant"  # constant | cosine (to 0 at max_steps)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    max_skipped_steps: int = 20  # consecutive non-finite steps before training aborts
    compile: bool = False  # torch.compile the model's forward in place (checkpoints unchanged); costs start-up time
    channels_last: bool = False  # NHWC inputs, so convolutions run NHWC where they can; weights stay NCHW (DeepSpeed)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed JSON keys, merged last


@dataclass
class CheckpointConfig:
    every: int = 5000  # steps between checkpoints
    keep: int = 3  # committed checkpoints to keep; the newest is never deleted
    dir: str = ""  # where checkpoints go: any fsspec URL (s3://bucket/run); empty: run.dir/checkpoints
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for dir; secrets never logged


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow tracking from rank 0 (metrics.jsonl in run.dir is written either way)
    uri: str = ""  # MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else a local store in run.dir/mlflow
    experiment: str = "diffusion-dist"
    log_every: int = 100  # steps between metric logs
    sample_every: int = 5000  # steps between EMA sample grids (fixed seed and labels); 0 disables
    prompts: list[str] = field(default_factory=list)  # a text model's grid rows; empty: its dataset's examples
    max_pending: int = 10_000  # records held while the server is unreachable; beyond, new ones are dropped
    flush_timeout: float = 120.0  # seconds the end of a run waits for undelivered records


@dataclass
class EvalConfig:
    every: int = 0  # steps between in-training FIDs of the EMA weights (model.kind=unet); 0 disables
    num_samples: int = 1000  # samples per in-training FID over all ranks: few, so FID is biased up; compare runs
    cfg_scale: float = 0.5  # w of ε̃ = (1 + w)·ε_c − w·ε_∅; 0.5 is DiT-XL/2's best-FID s = 1 + w = 1.5
    sampler: str = "ddim"  # ddpm | ddim
    sample_steps: int = 50  # respaced chain length
    batch_size: int = 64  # samples per forward per rank
    reference: str = ""  # statistics file (.npz with mu, sigma) or dataset URL; empty: data.url, decoded
    reference_samples: int = 10_000  # samples of a dataset reference (its first ones, in manifest order)
    feature_extractor: str = "inception-v3-compat"  # torch-fidelity's TF-compatible InceptionV3, or module:Class
    feature_weights: str = ""  # the extractor's weights file; empty: the library's standard location


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), world_size: int = 1, *, training: bool = False
) -> Config:
    """Defaults, then the YAML at `path`, then `section.key=value` overrides; validated for world_size ranks.

    training: also require what a training run reads (data.url); launch.train and launch.submit set it."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _load_yaml(Path(path)), source=str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        shown = repr(redact_text(item))
        if not sep or not key or "." not in key:
            raise ConfigError(f"override {shown} is not of the form section.key=value (e.g. train.max_steps=1000)")
        if not value.strip():  # YAML reads `key=` as null; mean the empty string (tracking.uri=, run.name=)
            item = f"{key}=''"
        try:
            update = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            reason = e.problem if isinstance(e, yaml.MarkedYAMLError) and e.problem else str(e).splitlines()[0]
            raise ConfigError(
                f"override {shown}: the value is not valid YAML ({redact_text(reason)}); quote it, e.g. {key}='...'"
            ) from None
        merged = _merge(merged, update, source=f"override {shown}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # e.g. an ${interpolation} that does not resolve
        raise ConfigError(f"invalid value for {e.full_key}: {redact_text(str(e).splitlines()[0])}") from None
    validate(config, world_size, training=training)
    return config


def _load_yaml(path: Path) -> DictConfig:
    """The YAML at `path` as a mapping of sections; a ConfigError names the file (and line) at fault."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML such as configs/demo.yaml")
    try:
        tree = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"{path}{_yaml_problem(e)}; fix the syntax there") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)}); fix the syntax") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); pass a YAML file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {redact_text(str(e).splitlines()[0])}") from None
    if not isinstance(tree, DictConfig):
        raise ConfigError(f"{path}: the top level must map sections to keys (run:, model:, train:, ...), not a list")
    return tree


def _yaml_problem(error: yaml.YAMLError) -> str:
    """', line 3, column 1: not valid YAML: did not find expected ']' (while parsing a flow sequence at
    line 2, column 7)': the parser's reason and positions (1-based) on one line; just the reason unmarked."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return redact_text(str(error).splitlines()[0] if str(error) else type(error).__name__)

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, context = error.problem or "syntax error", error.context
    if error.problem_mark is None and error.context_mark is not None:
        problem, context, mark, context_mark = context or problem, None, error.context_mark, None
    else:
        mark, context_mark = error.problem_mark, error.context_mark
    text = f", {at(mark)}: not valid YAML: {problem}" if mark else f": not valid YAML: {problem}"
    if context:
        text += f" ({context}" + (f" at {at(context_mark)})" if context_mark else ")")
    return redact_text(text)


def _merge(base: Any, update: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {_unknown_key_message(e.full_key)}") from None
    except OmegaConfBaseException as e:
        reason = redact_text(str(e).splitlines()[0])
        if reason.startswith("Incompatible value 'None'"):  # `key:` with nothing after it in a YAML
            reason = "no value given; set one, or remove the key to keep the default"
        raise ConfigError(f"{source}: invalid value for {e.full_key}: {reason}") from None


def _unknown_key_message(full_key: str) -> str:
    """'unknown key model.sise; did you mean model.size? ...' with the valid keys of its section."""
    section, _, key = full_key.partition(".")
    sections = {f.name: f.type for f in fields(Config)}
    if section not in sections:
        candidates, where = list(sections), "sections"
        guess = section
    else:
        candidates = [f.name for f in fields(getattr(Config(), section))]
        where, guess = f"keys of {section}", key
    close = difflib.get_close_matches(guess, candidates, n=1)
    hint = f"; did you mean {section + '.' if section in sections else ''}{close[0]}?" if close else ""
    return f"unknown key {full_key}{hint} (valid {where}: {', '.join(candidates)})"


def validate(config: Config, world_size: int = 1, *, training: bool = False) -> None:
    """Raise ConfigError naming the first key whose value cannot run (training: also data.url)."""

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            value = redact(_get(config, key))
            raise ConfigError(f"{key}={value!r}: {message}")

    def choice(key: str, options: Sequence[Any]) -> None:
        check(_get(config, key) in options, key, f"choose one of {', '.join(map(str, options))}")

    # nan passes every `x >= 0` test that is written `not x < 0`, and inf passes `x > 0`: refuse both first.
    for section in fields(config):
        for item in fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), item.name)
            if isinstance(value, float):
                check(math.isfinite(value), f"{section.name}.{item.name}", "must be a finite number")
    run, model, diffusion, train = config.run, config.model, config.diffusion, config.train
    check(bool(run.dir), "run.dir", "set the output directory")
    check(
        not training or bool(config.data.url.strip()),
        "data.url",
        "set the dataset: a folder, file:// or s3://bucket/prefix URL holding the manifest.json that "
        "python -m data_tools.encode_latents writes",
    )
    check(run.seed >= 0, "run.seed", "must be >= 0")
    choice("model.kind", MODEL_KINDS)
    choice("model.size", list(UNET_SIZES))
    check(model.num_classes >= 0, "model.num_classes", "must be >= 0 (0: unconditional)")
    check(
        model.kind != "classifier" or model.num_classes >= 2,
        "model.num_classes",
        "a classifier (model.kind=classifier) needs at least 2 classes and labelled data",
    )
    check(0 <= model.dropout < 1, "model.dropout", "must lie in [0, 1)")
    check(
        not (model.text and model.kind != "unet"),
        "model.text",
        "only a diffusion model (model.kind=unet) takes text; a classifier guides by class",
    )
    choice("diffusion.schedule", SCHEDULES)
    check(diffusion.num_timesteps >= 1, "diffusion.num_timesteps", "must be >= 1")
    choice("diffusion.variance", VARIANCES)
    check(diffusion.input_perturbation >= 0, "diffusion.input_perturbation", "γ must be >= 0 (0 disables DDPM-IP)")
    check(0 <= diffusion.p_uncond < 1, "diffusion.p_uncond", "must lie in [0, 1)")
    check(diffusion.vlb_weight >= 0, "diffusion.vlb_weight", "must be >= 0")
    choice("diffusion.sampler", list(SAMPLERS))
    check(
        1 <= diffusion.sample_steps <= diffusion.num_timesteps,
        "diffusion.sample_steps",
        f"must lie in [1, diffusion.num_timesteps={diffusion.num_timesteps}]",
    )
    check(diffusion.guidance_scale >= 0, "diffusion.guidance_scale", "must be >= 0 (w; DiT's scale s = 1 + w)")
    check(config.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    check(config.data.shuffle_shards >= 1, "data.shuffle_shards", "must be >= 1")
    check(train.max_steps >= 1, "train.max_steps", "must be >= 1")
    check(train.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
    check(train.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    check(
        train.global_batch_size % (train.micro_batch_size * world_size) == 0,
        "train.micro_batch_size",
        f"micro_batch_size × world size ({train.micro_batch_size} × {world_size}) must divide "
        f"train.global_batch_size={train.global_batch_size}; change one of them",
    )
    choice("train.precision", list(PRECISIONS))
    choice("train.zero_stage", (0, 1, 2, 3))
    check(
        not (train.precision == "fp16" and train.zero_stage == 0),
        "train.zero_stage",
        "fp16 needs ZeRO stage >= 1 (DeepSpeed does not scale the loss of a plain optimizer); use 1-3 or bf16",
    )
    check(train.lr > 0, "train.lr", "must be > 0")
    check(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    choice("train.lr_schedule", LR_SCHEDULES)
    check(train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    check(0 <= train.ema_decay <= 1, "train.ema_decay", "must lie in [0, 1]")
    check(train.max_skipped_steps >= 1, "train.max_skipped_steps", "must be >= 1")
    for name in config.run.preempt_signals:
        check(
            name in signal.Signals.__members__,
            "run.preempt_signals",
            f"{name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)",
        )
        check(
            name not in _UNUSABLE_SIGNALS,
            "run.preempt_signals",
            f"{name} {_UNUSABLE_SIGNALS.get(name)}, so no checkpoint could be saved on it; use SIGUSR1, SIGUSR2 "
            "or SIGTERM",
        )
    check(run.collective_timeout_s > 0, "run.collective_timeout_s", "must be > 0 seconds")
    check(run.heartbeat_timeout_s >= 10, "run.heartbeat_timeout_s", "must be >= 10 seconds (heartbeats are 1 s apart)")
    check(config.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    check(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    check(config.tracking.log_every >= 1, "tracking.log_every", "must be >= 1")
    check(config.tracking.sample_every >= 0, "tracking.sample_every", "must be >= 0 (0 disables)")
    check(config.tracking.max_pending >= 1, "tracking.max_pending", "must be >= 1")
    check(config.tracking.flush_timeout >= 0, "tracking.flush_timeout", "must be >= 0 seconds")
    evaluation = config.eval
    check(evaluation.every >= 0, "eval.every", "must be >= 0 (0 disables)")
    check(
        not (evaluation.every and model.kind != "unet"),
        "eval.every",
        "in-training FID needs a diffusion model (model.kind=unet); set eval.every=0 for a classifier",
    )
    check(evaluation.num_samples >= 2, "eval.num_samples", "FID needs at least 2 samples")
    check(evaluation.cfg_scale >= 0, "eval.cfg_scale", "must be >= 0 (w; DiT's scale s = 1 + w)")
    choice("eval.sampler", list(SAMPLERS))
    check(
        not evaluation.every or 1 <= evaluation.sample_steps <= diffusion.num_timesteps,
        "eval.sample_steps",
        f"must lie in [1, diffusion.num_timesteps={diffusion.num_timesteps}]",
    )
    check(evaluation.batch_size >= 1, "eval.batch_size", "must be >= 1")
    check(evaluation.reference_samples >= 2, "eval.reference_samples", "FID needs at least 2 reference samples")


# Signals a preemption handler cannot use, and why.
_UNUSABLE_SIGNALS = {
    "SIGKILL": "cannot be caught",
    "SIGSTOP": "cannot be caught",
    **dict.fromkeys(("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL"), "reports a crash of this process"),
    **dict.fromkeys(("SIGCHLD", "SIGCLD"), "arrives whenever a data worker process ends"),
}


def gradient_accumulation_steps(config: Config, world_size: int) -> int:
    """Micro batches per rank per optimizer step: global = micro × accumulation × world size."""
    return config.train.global_batch_size // (config.train.micro_batch_size * world_size)


def _get(config: Config, dotted_key: str) -> Any:
    section, key = dotted_key.split(".")
    return getattr(getattr(config, section), key)


# Keys whose values are credentials: never printed, logged or stored.
# Keys whose values are credentials, in fsspec / boto / azure / gcs option names: secret, password,
# token, credential, auth headers, cookies, connection strings (hold an account key), SAS and
# signatures, and *key* as a word (key, access_key_id, accountKey; not log_sample_keys).
_SECRET_KEY = re.compile(
    r"secret|passw|token|credential|auth|cookie|connection_?string|signature|(^|_)sas(_|$)"
    r"|(^|_)key(_|$)|(?<=[a-z])Key(_|$)|(?<=[a-z])key$",
    re.I,
)


def redact(value: Any) -> Any:
    """A copy of nested dicts/lists with the values of secret-looking keys replaced by '***', and every URL
    in a string without user:password@ and query string (tokens, signatures): storage.redact_text."""
    if isinstance(value, Mapping):
        return {k: "***" if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def to_dict(config: Config, redact_secrets: bool = True) -> dict[str, Any]:
    """The config as plain nested dicts, with credentials redacted unless asked otherwise.

    Everything that writes or prints a config goes through here (config.yaml, checkpoints, MLflow
    params and artifact, --print-config, launch.submit --dry-run); the program itself reads the
    unredacted Config."""
    assert is_dataclass(config)
    tree = asdict(config)
    return redact(tree) if redact_secrets else tree


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, credentials redacted: what --print-config shows and runs save."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(config)))
