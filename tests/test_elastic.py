"""Elastic resume on CPU ranks: a checkpoint of 2 ranks at ZeRO-2 resumes on 1 rank at ZeRO-0, whose
checkpoint resumes on 3 ranks at ZeRO-3, with the same global batch.

Each job resumes from the previous run's store with `--resume` and saves its own first checkpoint at the
step it resumed (train.max_steps = that step), so the state it loaded can be compared tensor for tensor
with the one it read: weights, AdamW moments, EMA, update count, LR schedule, step and data cursor carry
over exactly. Then the chain trains on, and its losses and samples are compared with an uninterrupted
2-rank run: the same samples in every step, none skipped or repeated in the epoch, and losses equal up
to the order of floating-point sums (all-reduce over another number of ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import consumed_keys, metrics, overrides, train

pytestmark = pytest.mark.slow  # every test here starts processes


def args(run_dir: Path, data: Path, stage: int, steps: int, **extra) -> list[str]:
    # 24 samples per step: micro batch 4 × 3 accumulations on 2 ranks, × 6 on 1, × 2 on 3.
    settings = dict(train__global_batch_size=24, train__micro_batch_size=4, checkpoint__every=1000, data__num_workers=1)
    return overrides(run_dir, data, train__zero_stage=stage, train__max_steps=steps, **{**settings, **extra})


def checkpoint(run_dir: Path, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, every tensor of the checkpoint by key) of a run's committed step."""
    root = run_dir / "checkpoints"
    attempt = root / f"step-{step}" / json.loads((root / f"step-{step}.commit.json").read_text())["attempt"]
    tensors = {}
    for path in sorted(attempt.glob("tensors-*.safetensors")):
        tensors |= {k: v for k, v in load_file(path).items() if not k.startswith("rng/")}
    return json.loads((attempt / "state.json").read_text()), tensors


def assert_carried_over(before: tuple[dict, dict], after: tuple[dict, dict]) -> None:
    (state_a, tensors_a), (state_b, tensors_b) = before, after
    assert tensors_a.keys() == tensors_b.keys()
    for key, value in tensors_a.items():
        assert torch.equal(value, tensors_b[key]), key  # weight/, exp_avg/, exp_avg_sq/, ema/
    for key in ("progress", "optimizer", "ema", "data"):
        assert state_a[key] == state_b[key], key
    assert state_a["tracking"]["run_key"] == state_b["tracking"]["run_key"]  # the same MLflow run, one restart on


def test_two_to_one_to_three_ranks_across_zero_stages(digits_latents, tmp_path):
    whole = train(args(tmp_path / "whole", digits_latents, stage=2, steps=12))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    first = train(args(tmp_path / "a", digits_latents, stage=2, steps=4, checkpoint__every=4))
    assert first.returncode == 0, first.stderr[-3000:]
    # 2 ranks, ZeRO-2 -> 1 rank, ZeRO-0: saves step 4 again, then trains to 8.
    resume = ["--resume", str(tmp_path / "a" / "checkpoints" / "step-4")]
    second = train(args(tmp_path / "b", digits_latents, stage=0, steps=4) + resume, ranks=1)
    assert second.returncode == 0 and "at step 4" in second.stderr, second.stderr[-3000:]
    assert_carried_over(checkpoint(tmp_path / "a", 4), checkpoint(tmp_path / "b", 4))
    assert train(args(tmp_path / "b", digits_latents, stage=0, steps=8, checkpoint__every=8), ranks=1).returncode == 0
    # 1 rank, ZeRO-0 -> 3 ranks, ZeRO-3: saves step 8 again, then trains to 12.
    resume = ["--resume", str(tmp_path / "b" / "checkpoints" / "step-8")]
    third = train(args(tmp_path / "c", digits_latents, stage=3, steps=8) + resume, ranks=3)
    assert third.returncode == 0 and "at step 8" in third.stderr, third.stderr[-3000:]
    assert_carried_over(checkpoint(tmp_path / "b", 8), checkpoint(tmp_path / "c", 8))
    assert train(args(tmp_path / "c", digits_latents, stage=3, steps=12), ranks=3).returncode == 0

    # The same samples in every step as the uninterrupted run: none skipped or repeated in the epoch.
    def samples(run_dir: Path, ranks: int) -> dict[int, list[str]]:
        steps: dict[int, list[str]] = {}
        for rank in range(ranks):
            for step, keys in consumed_keys(run_dir, rank).items():
                steps.setdefault(step, []).extend(keys)
        return {step: sorted(keys) for step, keys in steps.items()}

    chain = samples(tmp_path / "a", 2) | samples(tmp_path / "b", 1) | samples(tmp_path / "c", 3)
    assert chain == samples(tmp_path / "whole", 2)
    taken = [key for step in sorted(chain) for key in chain[step]]
    assert len(taken) == len(set(taken)) == 12 * 24  # the digits' first epoch holds more than 12 steps
    # Losses: the uninterrupted run's, up to the order of sums over another number of ranks.
    losses = {**metrics(tmp_path / "a"), **metrics(tmp_path / "b"), **metrics(tmp_path / "c")}
    expected = metrics(tmp_path / "whole")
    np.testing.assert_allclose(
        [losses[s]["loss"] for s in range(1, 13)], [expected[s]["loss"] for s in range(1, 13)], rtol=1e-4
    )


def test_a_changed_global_batch_is_refused(digits_latents, tmp_path):
    assert train(args(tmp_path, digits_latents, stage=2, steps=2, checkpoint__every=2)).returncode == 0
    changed = train(args(tmp_path, digits_latents, stage=2, steps=4, train__global_batch_size=16))
    assert changed.returncode != 0 and "global batch" in changed.stderr, changed.stderr[-3000:]
