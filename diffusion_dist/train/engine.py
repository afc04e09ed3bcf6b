"""DeepSpeed applied to a plain nn.Module, in one place, from the typed config.

This is the only module that imports DeepSpeed or reads its internals. The loop sees an
`Engine` that behaves like a model plus optimizer: call it, `backward(loss)` per micro batch,
`step()` once per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, gradient_accumulation_steps


def deepspeed_config(config: Config, world_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed JSON derived from the config; train.deepspeed keys are merged last (escape hatch)."""
    train = config.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, world_size),
        # Without ZeRO the engine clips (Engine.step): one foreach norm, which it needs anyway to skip
        # non-finite steps, instead of DeepSpeed's norm per parameter.
        "gradient_clipping": train.grad_clip if train.zero_stage else 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 2**62,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if train.zero_stage == 2 and device_type == "cuda":
        # Reduce gradient buckets on a side stream while backward goes on (off by default in DeepSpeed;
        # benchmarks/RESULTS.md, "Scaling on paper", estimates what it hides). Not on CPU ranks: gloo
        # has no streams to overlap with.
        ds["zero_optimization"]["overlap_comm"] = True
    if train.precision == "bf16":
        # Mixed precision as a plain PyTorch loop does it: fp32 parameters (what the optimizer, the EMA
        # and the export read), bf16 matmuls and convolutions under torch.autocast in engine.forward.
        # DeepSpeed then reduces the gradients of Linear and Conv2d weights in bf16 (half the bytes).
        # Its "bf16" mode instead casts the module to bf16 and keeps an fp32 master copy: extra
        # flat-buffer copies every step, and bf16 weights everywhere but in the optimizer.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0: dynamic scaling
    return _merge(ds, train.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_lambda(config: Config):
    """Linear warmup from 0 over warmup_steps, then constant or cosine decay to 0 at max_steps."""
    warmup, total, schedule = config.train.warmup_steps, config.train.max_steps, config.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


@dataclass
class StepResult:
    """What one optimizer step did."""

    applied: bool  # False: a non-finite loss or gradient; the weights were left alone
    grad_norm: torch.Tensor | float | None  # global gradient norm before clipping; None when skipped


class Engine:
    """The model, AdamW and the LR schedule under DeepSpeed (ZeRO stage, precision, clipping from the config).

    AdamW is torch's (fused on GPU), so CPU runs need no compiled optimizer and every ZeRO stage
    partitions the same optimizer. Non-finite steps are skipped on every rank together: DeepSpeed's
    ZeRO and fp16 optimizers detect them themselves; without ZeRO the engine checks the global
    gradient norm, which is the same on every rank after the all-reduce.
    """

    def __init__(self, model: nn.Module, config: Config, world_size: int, device: torch.device) -> None:
        import deepspeed

        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.train.lr,
            weight_decay=config.train.weight_decay,
            fused=device.type == "cuda",
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        ds_config = deepspeed_config(config, world_size, device.type)
        if "torch_autocast" in ds_config:
            # DeepSpeed reduces in bf16 the gradients of modules whose class is exactly one it lists;
            # name ours (TokenLinear is a Conv2d subclass), or attention weights would travel in fp32.
            ds_config["torch_autocast"].setdefault("lower_precision_safe_modules", _matmul_module_classes(model))
        self._ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        if config.train.compile:
            self._ds.compile()  # module.compile(): in place, so parameter names and checkpoints stay the eager ones
        self.module: nn.Module = self._ds.module
        self.accumulation = self._ds.gradient_accumulation_steps()
        self.zero_stage = config.train.zero_stage
        self.grad_clip = config.train.grad_clip
        self.fp16 = config.train.precision == "fp16"
        # fp16 modules take fp16 inputs; under autocast (bf16) inputs stay fp32 and ops cast themselves.
        self.input_dtype = torch.float16 if self.fp16 else torch.float32
        self._micro_batches = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._ds(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro batch's loss (DeepSpeed divides by the accumulation steps)."""
        self._ds.backward(loss)
        self._micro_batches += 1
        if self._micro_batches < self.accumulation:
            self._ds.step()  # DeepSpeed counts micro batches in step(); it updates only at the last one

    def step(self) -> StepResult:
        """The optimizer step after `accumulation` backward calls, or a skipped one on every rank."""
        if self._micro_batches != self.accumulation:
            raise RuntimeError(f"step() after {self._micro_batches} backward calls; expected {self.accumulation}")
        self._micro_batches = 0
        if self.zero_stage:
            skipped_before = self._ds.skipped_steps
            self._ds.step()
            if self._ds.skipped_steps > skipped_before:
                return StepResult(applied=False, grad_norm=None)
            return StepResult(applied=True, grad_norm=self._ds.get_global_grad_norm())
        grad_norm = clip_gradients(self.module, self.grad_clip)
        if torch.isfinite(grad_norm).item():
            self._ds.step()
            return StepResult(applied=True, grad_norm=grad_norm)
        # Without ZeRO, DeepSpeed would apply non-finite gradients: zero them and suppress the update
        # (AdamW would still move the weights on zero gradients), while DeepSpeed advances its counters.
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        optimizer = self._ds.optimizer
        optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method
        try:
            self._ds.step()
        finally:
            del optimizer.step
        return StepResult(applied=False, grad_norm=None)

    @property
    def lr(self) -> float:
        return self._ds.get_lr()[0]

    @property
    def loss_scale(self) -> float | None:
        """The dynamic fp16 loss scale (None in fp32 and bf16, which need none)."""
        return float(self._ds.optimizer.cur_scale) if self.fp16 else None

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: each rank holds only a flat slice of every parameter."""
        return any(hasattr(p, "ds_tensor") for p in self.module.parameters())

    def local_parameters(self) -> list[tuple[str, torch.Tensor, torch.Size]]:
        """(name, the tensor this rank holds, the full shape) per parameter: the whole parameter, or
        under ZeRO-3 this rank's flat slice (zero-padded at the end of the last rank's)."""
        return [
            (name, p.ds_tensor, p.ds_shape) if hasattr(p, "ds_tensor") else (name, p.data, p.shape)
            for name, p in self.module.named_parameters()
        ]

    @torch.no_grad()
    def full_weights(self) -> dict[str, torch.Tensor]:
        """The trained (not averaged) weights in fp32 on every rank, gathered under ZeRO-3 (a collective)."""
        import deepspeed

        params = dict(self.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {name: p.detach().float().clone() for name, p in params.items()}

    def save(self, directory: Path) -> None:
        """DeepSpeed's files for this step (module, optimizer partitions, LR schedule) into `directory`
        (a collective). Its `latest` pointer is never written."""
        self._ds.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load(self, directory: Path) -> None:
        """The state `save` wrote into `directory` (a collective)."""
        path, _ = self._ds.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {directory}")


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _matmul_module_classes(model: nn.Module) -> list[str]:
    """Import paths of the model's Linear and convolution classes, subclasses included."""
    matmuls = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules() if isinstance(m, matmuls)})


def clip_gradients(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global 2-norm of max_norm (0: no clipping) and return their norm before
    clipping as a tensor: inf or nan if a gradient is not finite (the caller skips that step)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)  # one kernel for all
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)  # takes parameters, not grads
    return norm
