"""DeepSpeed applied to a plain nn.Module, in one place, from the typed config.

This is the only module that imports DeepSpeed or reads its internals. The loop sees an
`Engine` that behaves like a model plus optimizer: call it, `backward(loss)` per micro batch,
`step()` once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that would run code or build arbitrary objects when unpickled."""


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
        self.device, self.rank, self.world_size = device, self._ds.global_rank, world_size
        self.accumulation = self._ds.gradient_accumulation_steps()
        self.zero_stage = config.train.zero_stage
        self.grad_clip = config.train.grad_clip
        self.fp16 = config.train.precision == "fp16"
        # fp16 modules take fp16 inputs; under autocast (bf16) inputs stay fp32 and ops cast themselves.
        self.input_dtype = torch.float16 if self.fp16 else torch.float32
        self._micro_batches = 0

    def __call__(self, *inputs: torch.Tensor, **keywords: torch.Tensor) -> torch.Tensor:
        return self._ds(*inputs, **keywords)

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

    # The training state as plain tensors, whatever the ZeRO stage and world size: what checkpoints hold.

    @torch.no_grad()
    def consolidated(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(name, {"weight", "exp_avg", "exp_avg_sq"}) per parameter in module order: the fp32 master
        weight and AdamW's moments as full CPU tensors on every rank (under ZeRO a collective per
        parameter: each rank contributes its partition). Zero moments before the first step."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        started = bool(self._optimizer().state)
        for name, p in self.module.named_parameters():
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            if self.zero_stage == 0:
                state = self._optimizer().state.get(p, {})
                tensors = {"weight": p.detach()} | {key: state[key] for key in MOMENTS if key in state}
            else:
                tensors = {"weight": safe_get_full_fp32_param(p)}
                if started:
                    tensors |= {key: safe_get_full_optimizer_state(p, key) for key in MOMENTS}
            yield (
                name,
                {
                    key: tensors[key].detach().float().cpu().reshape(shape).clone()
                    if key in tensors
                    else torch.zeros(shape)
                    for key in ("weight", *MOMENTS)
                },
            )

    def optimizer_state(self) -> dict[str, Any]:
        """What AdamW and the LR schedule hold besides per-parameter tensors: the update count and the
        schedule's position (plain data)."""
        states = list(self._optimizer().state.values())
        schedule = self._ds.lr_scheduler.state_dict()
        return {
            "steps": int(states[0]["step"]) if states else 0,
            "lr_schedule": {"last_epoch": schedule["last_epoch"], "step_count": schedule["_step_count"]},
        }

    @torch.no_grad()
    def load_consolidated(
        self, tensors: Iterable[tuple[str, dict[str, torch.Tensor]]], optimizer: dict[str, Any]
    ) -> None:
        """Set weights, moments, update count and LR schedule from what `consolidated` and
        `optimizer_state` returned, possibly on another world size or ZeRO stage. `tensors` comes in
        module order, one parameter at a time, with full tensors on every rank; each rank keeps its
        partition."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._materialize_optimizer_state()
        for (name, p), (saved_name, saved) in zip(self.module.named_parameters(), tensors, strict=True):
            if saved_name != name:
                raise ValueError(f"the checkpoint has parameter {saved_name!r} where the model has {name!r}")
            saved = {key: value.to(self.device) for key, value in saved.items()}
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's slice of the flattened parameter, zero-padded
                local = p.ds_tensor
                piece = saved["weight"].flatten()[local.numel() * self.rank : local.numel() * (self.rank + 1)]
                local.copy_(torch.nn.functional.pad(piece, (0, local.numel() - piece.numel())))
            else:
                p.data.copy_(saved["weight"].view_as(p))
            if self.zero_stage == 0:
                state = self._optimizer().state[p]
                for key in MOMENTS:
                    state[key].copy_(saved[key].view_as(p))
            elif self.zero_stage == 3:
                # DeepSpeed's set_full_hp_param fails when the last partition is padded; its fp32 partition
                # (and the moments') are this rank's slice of the zero-padded flat tensor, as ds_tensor is.
                for key in (None, *MOMENTS):
                    part, _ = self._ds.optimizer._get_fp32_opt_state_partition(p, False, optim_state_key=key)
                    full = saved["weight" if key is None else key].flatten()
                    piece = full[part.numel() * self.rank : part.numel() * (self.rank + 1)]
                    part.copy_(torch.nn.functional.pad(piece, (0, part.numel() - piece.numel())))
            else:
                safe_set_full_fp32_param(p, saved["weight"])
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, saved[key], key)
        for state in self._optimizer().state.values():
            state["step"].fill_(optimizer["steps"])
        schedule = self._ds.lr_scheduler
        schedule.last_epoch, schedule._step_count = (
            optimizer["lr_schedule"]["last_epoch"],
            optimizer["lr_schedule"]["step_count"],
        )
        for group, lr in zip(self._optimizer().param_groups, schedule.get_lr(), strict=True):
            group["lr"] = lr
        schedule._last_lr = [group["lr"] for group in self._optimizer().param_groups]
        self._ds.global_steps = optimizer["steps"]
        if hasattr(self._ds.optimizer, "checkpoint_event_epilogue"):
            # ZeRO-3 regathers the parameters it keeps whole (small ones) from the new partitions, as
            # after an optimizer step; otherwise the first forward would gather them another way.
            self._ds.optimizer.checkpoint_event_epilogue()

    def _optimizer(self) -> torch.optim.Optimizer:
        """torch's AdamW: the engine's own without ZeRO; under ZeRO the one DeepSpeed steps over its
        flat fp32 partitions (the client optimizer, regrouped)."""
        return self._ds.optimizer if self.zero_stage == 0 else self._ds.optimizer.optimizer

    @torch.no_grad()
    def _materialize_optimizer_state(self) -> None:
        """AdamW creates its moments at its first step: take one with zero gradients and a zero learning
        rate and weight decay (weights unchanged, moments zero), so that loading has states to fill."""
        optimizer = self._optimizer()
        if not optimizer.state:
            saved = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = 0.0, 0.0
            for group_index, params in self._optimizer_param_groups():
                kept = optimizer.param_groups[group_index]["params"]
                optimizer.param_groups[group_index]["params"] = params
                for p in params:
                    p.grad = torch.zeros_like(p)
                optimizer.step()
                for p in params:
                    p.grad = None
                optimizer.param_groups[group_index]["params"] = kept
            for group, (lr, weight_decay) in zip(optimizer.param_groups, saved, strict=True):
                group["lr"], group["weight_decay"] = lr, weight_decay
        if hasattr(self._ds.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link fragments lazily
            self._ds.optimizer._lazy_init_hp_params_optimizer_state()

    def _optimizer_param_groups(self) -> list[tuple[int, list[torch.Tensor]]]:
        """(param group, the tensors AdamW updates for it): ZeRO-3 swaps its flat fp32 sub-groups into the
        group one at a time (stage3._optimizer_step); the other stages keep them in place."""
        if self.zero_stage == 3:
            ds = self._ds.optimizer
            return [(ds.sub_group_to_group_id[i], [flat]) for i, flat in enumerate(ds.fp32_partitioned_groups_flat)]
        return [(i, list(group["params"])) for i, group in enumerate(self._optimizer().param_groups)]

    def load_legacy(self, directory: Path) -> None:
        """DeepSpeed's own files of a checkpoint written before format 2 (same world size and ZeRO stage
        only; a collective). Each file is first read with weights_only=True, so one that carries any
        other object than tensors and DeepSpeed's three plain records is refused before DeepSpeed unpickles it."""
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, ZeroStageEnum, fragment_address]
        for path in sorted(directory.glob("*.pt")):
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any object beyond tensors and plain data
                raise UnsafeCheckpoint(
                    f"{path} holds objects beyond tensors and plain data; not loading it ({e})"
                ) from None
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
