"""DeepSpeed applied to a plain nn.Module, in one place, from the typed config."""

from __future__ import annotations

import math
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
        # Without ZeRO the loop clips (clip_gradients): one foreach norm, which it needs anyway to skip
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


def build_engine(model: nn.Module, config: Config, world_size: int, device: torch.device):
    """The DeepSpeed engine around `model`, with AdamW and the LR schedule as client objects.

    AdamW is torch's (fused on GPU), so CPU runs need no compiled optimizer and every ZeRO
    stage partitions the same optimizer.
    """
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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if config.train.compile:
        engine.compile()  # module.compile(): in place, so parameter names and checkpoints stay the eager ones
    return engine


def _matmul_module_classes(model: nn.Module) -> list[str]:
    """Import paths of the model's Linear and convolution classes, subclasses included."""
    matmuls = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules() if isinstance(m, matmuls)})


def input_dtype(config: Config) -> torch.dtype:
    """The dtype the engine's forward takes: fp16 modules take fp16 inputs; autocast (bf16) casts by itself."""
    return torch.float16 if config.train.precision == "fp16" else torch.float32


def clip_gradients(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Without ZeRO: clip the (already all-reduced) gradients to max_norm (0: no clipping) and return their
    global 2-norm as a tensor, inf or nan if a gradient is not finite (the caller skips that step)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)  # one kernel for all
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)  # takes parameters, not grads
    return norm
