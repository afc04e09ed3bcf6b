"""The EMA against its closed form, its warmup schedule, state round trips and ZeRO-3 slice reassembly.
(tests/scripts/ema_zero3.py checks the slices of a real 2-rank ZeRO-3 run against gathered weights.)"""

from __future__ import annotations

import pytest
import torch

from diffusion_dist.train.ema import EMA, assemble


def parameters_of(*tensors: torch.Tensor):
    return lambda: [(f"p{i}", t, t.shape) for i, t in enumerate(tensors)]


def test_update_is_the_exponential_moving_average():
    theta = torch.tensor([1.0, -2.0])
    ema = EMA(parameters_of(theta), decay=0.9, warmup=False)
    expected = theta.clone()
    for value in (3.0, 5.0, -1.0):
        theta.fill_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    torch.testing.assert_close(ema.full_state_dict()["p0"], expected)
    assert ema.updates == 3


def test_warmup_decay_is_one_plus_n_over_ten_plus_n():
    ema = EMA(parameters_of(torch.zeros(1)), decay=0.999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.updates = 10_000
    assert ema.current_decay() == 0.999


def test_state_dict_round_trip_and_mismatch():
    theta = torch.arange(6.0).view(2, 3)
    ema = EMA(parameters_of(theta), decay=0.5)
    theta.add_(1)
    ema.update()
    other = EMA(parameters_of(torch.zeros(2, 3)), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 1
    with pytest.raises(ValueError, match="EMA slice of shape"):
        EMA(parameters_of(torch.zeros(3, 2).view(6)), decay=0.5).load_state_dict(ema.state_dict())


def test_assemble_reverses_zero3_slicing():
    """ZeRO-3 splits each flattened parameter into equal slices per rank, padding the last with zeros."""
    full = {"a": torch.arange(5.0), "b": torch.arange(6.0).view(2, 3) + 10}
    ranks = 2
    states = []
    for r in range(ranks):
        shadow = []
        for tensor in full.values():
            per_rank = -(-tensor.numel() // ranks)
            padded = torch.cat([tensor.flatten(), torch.zeros(per_rank * ranks - tensor.numel())])
            shadow.append(padded[r * per_rank : (r + 1) * per_rank])
        states.append({"shadow": shadow, "updates": 0, "decay": 0.9})
    layout = {"names": ["a", "b"], "shapes": [[5], [2, 3]], "partitioned": True}
    assembled = assemble(layout, states)
    assert all(torch.equal(assembled[k], full[k]) for k in full)
