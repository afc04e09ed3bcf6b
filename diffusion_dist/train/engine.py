"""DeepSpeed applied to a plain nn.Module, in one place, from the typed config."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import Config, gradient_accumulation_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON derived from the config; train.deepspeed keys are merged last (escape hatch)."""
    train = config.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, world_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 2**62,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
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
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(config, world_size)
    )
    if config.train.compile:
        engine.compile()  # module.compile(): in place, so parameter names and checkpoints stay the eager ones
    return engine
