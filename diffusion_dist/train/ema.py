"""An fp32 exponential moving average of the weights, correct under every ZeRO stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..distributed import all_gather_cat


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step, kept in float32.

    `parameters` returns (name, tensor this rank holds, full shape) per parameter, as
    Engine.local_parameters does: whole parameters, or under ZeRO-3 (`partitioned`) this rank's
    flat slice of each (asked anew at each update: DeepSpeed may replace the tensors).
    Each rank then averages only its slices, so the EMA costs 4 bytes per parameter divided by
    the world size, like the optimizer state; full weights are gathered only for export. With
    warmup, d = min(decay, (1 + n) / (10 + n)) after n updates, so early weights are not frozen
    into the average.
    """

    def __init__(
        self,
        parameters: Callable[[], list[tuple[str, torch.Tensor, torch.Size]]],
        decay: float,
        warmup: bool = True,
        partitioned: bool = False,
    ) -> None:
        self.parameters = parameters
        current = parameters()
        self.names = [name for name, _, _ in current]
        self.shapes = [torch.Size(shape) for _, _, shape in current]
        self.decay, self.warmup, self.partitioned = decay, warmup, partitioned
        self.updates = 0
        self.shadow = [tensor.detach().float().clone() for _, tensor, _ in current]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [tensor.float() for _, tensor, _ in self.parameters()], weight)
        self.updates += 1

    @torch.no_grad()
    def full_tensor(self, index: int) -> torch.Tensor:
        """Parameter `index`'s average as a full fp32 tensor on every rank (gathers its slices under
        ZeRO-3: a collective)."""
        local, shape = self.shadow[index], self.shapes[index]
        if not self.partitioned:
            return local.clone()
        return all_gather_cat(local)[: shape.numel()].view(shape).clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> full fp32 tensor on every rank (a collective under ZeRO-3)."""
        return {name: self.full_tensor(i) for i, name in enumerate(self.names)}

    @torch.no_grad()
    def load_full_tensor(self, index: int, full: torch.Tensor, rank: int = 0) -> None:
        """Set parameter `index`'s average from its full tensor: all of it, or under ZeRO-3 this rank's
        slice (the flattened tensor zero-padded to a whole number of slices, as ZeRO-3 cuts it)."""
        local = self.shadow[index]
        flat = full.detach().float().flatten()
        if self.partitioned:
            piece = flat[local.numel() * rank : local.numel() * (rank + 1)]
            flat = torch.nn.functional.pad(piece, (0, local.numel() - piece.numel()))
        local.copy_(flat.view_as(local))

    def layout(self) -> dict[str, Any]:
        """Names and full shapes, to reassemble the slices of every rank offline (launch.export)."""
        return {"names": self.names, "shapes": [list(s) for s in self.shapes], "partitioned": self.partitioned}

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
