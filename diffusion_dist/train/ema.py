"""An fp32 exponential moving average of the weights, correct under every ZeRO stage."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _partitioned(param: nn.Parameter) -> bool:
    """ZeRO-3 keeps only a flat slice of each parameter on each rank, in `ds_tensor`."""
    return hasattr(param, "ds_tensor")


def _local(param: nn.Parameter) -> torch.Tensor:
    return param.ds_tensor if _partitioned(param) else param.data


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step, kept in float32.

    Under ZeRO-3 each rank averages only its own slice of every parameter, so the EMA costs
    4 bytes per parameter divided by the world size, like the optimizer state; full weights
    are gathered only for export. With warmup, d = min(decay, (1 + n) / (10 + n)) after n
    updates, so early weights are not frozen into the average.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @property
    def partitioned(self) -> bool:
        return any(_partitioned(p) for p in self.params)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [_local(p).float() for p in self.params], weight)
        self.updates += 1

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> full fp32 tensor on every rank (gathers the slices under ZeRO-3; a collective)."""
        if not self.partitioned:
            return {name: t.clone() for name, t in zip(self.names, self.shadow, strict=True)}
        full = {}
        for name, param, local in zip(self.names, self.params, self.shadow, strict=True):
            pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, local)
            full[name] = torch.cat(pieces)[: param.ds_numel].view(param.ds_shape).clone()
        return full

    def layout(self) -> dict[str, Any]:
        """Names and full shapes, to reassemble the slices of every rank offline (launch.export)."""
        shapes = [list(p.ds_shape) if _partitioned(p) else list(p.shape) for p in self.params]
        return {"names": self.names, "shapes": shapes, "partitioned": self.partitioned}

    def state_dict(self) -> dict[str, Any]:
        """This rank's share: every slice under ZeRO-3, else the whole (identical on all ranks)."""
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        for mine, saved in zip(self.shadow, state["shadow"], strict=True):
            if mine.shape != saved.shape:
                raise ValueError(f"EMA slice of shape {tuple(saved.shape)} where {tuple(mine.shape)} was expected")
            mine.copy_(saved)
        self.updates = int(state["updates"])


def assemble(layout: dict[str, Any], states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full EMA weights from saved states: every rank's slices under ZeRO-3, else one rank's whole copy."""
    full = {}
    for i, (name, shape) in enumerate(zip(layout["names"], layout["shapes"], strict=True)):
        if layout["partitioned"]:
            flat = torch.cat([state["shadow"][i] for state in states])
            full[name] = flat[: int(torch.Size(shape).numel())].view(shape).clone()
        else:
            full[name] = states[0]["shadow"][i].clone()
    return full
