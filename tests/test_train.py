"""The DeepSpeed trainer on CPU with gloo: exact resume after kill -9, ZeRO stages vs one rank,
checkpoint selection, preemption, non-finite steps, export and sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from diffusion_dist.pictures import grid_layout
from diffusion_dist.train.checkpoint import committed_steps
from tests.conftest import ROOT, free_port
from tests.latent_data import write_dataset

pytestmark = pytest.mark.slow  # every test here starts processes

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    base = {
        "run.dir": run_dir,
        "data.url": data,
        "data.num_workers": 1,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 8,
        "train.warmup_steps": 0,
        "tracking.log_every": 1,
        "checkpoint.every": 1000,
        "run.log_sample_keys": "true",
        "train.max_steps": 10,
        "tracking.enabled": "false",  # tests/test_tracking.py covers MLflow
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def command(args: list[str], ranks: int) -> list[str]:
    if ranks == 0:  # a plain single process, no launcher
        return [sys.executable, "-m", "launch.train", "configs/demo.yaml", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_port={free_port()}",
        "-m",
        "launch.train",
        "configs/demo.yaml",
        *args,
    ]


def train(args: list[str], ranks: int = 2, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(args, ranks), cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def start(args: list[str], ranks: int = 2, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command(args, ranks),
        cwd=ROOT,
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def metrics(run_dir: Path) -> dict[int, dict]:
    """The last record written for each step (a resumed run rewrites the steps after its checkpoint)."""
    records = {}
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            records[record["step"]] = record
    return records


def consumed_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """Keys per step; where a restarted run logs a step again, its entries replace the killed run's."""
    steps: dict[int, list[str]] = {}
    previous = 0
    for line in (run_dir / "logs" / f"keys-rank{rank}.txt").read_text().splitlines():
        step, key = int(line.split("\t")[0]), line.split("\t")[1]
        if step < previous:  # a restart: forget what the killed run consumed from here on
            steps = {s: keys for s, keys in steps.items() if s < step}
        previous = step
        steps.setdefault(step, []).append(key)
    return steps


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = max(metrics(run_dir), default=0)
        if done >= step:
            return done
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def kill_tree(process: subprocess.Popen) -> None:
    """kill -9 the launcher and every rank and data worker under it (they run in their own groups)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_kill_is_bit_identical(digits_latents, tmp_path, stage):
    """60 steps uninterrupted vs killed (-9, both ranks) after step 37 with checkpoints every 30, then restarted.

    With ZeRO-2, MLflow tracking (local store), sample grids every 25 steps and dropout (which draws
    from the global RNG) are on: the restart builds the grid model anew, which must not draw from it."""
    tracking = {"tracking__enabled": "true", "tracking__sample_every": 25, "model__dropout": 0.1} if stage == 2 else {}

    def args(run_dir: Path) -> list[str]:
        return overrides(
            run_dir, digits_latents, train__max_steps=60, checkpoint__every=30, train__zero_stage=stage, **tracking
        )

    whole = train(args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr

    killed = tmp_path / "killed"
    process = start(args(killed))
    reached = wait_for_step(killed, 37, process)
    kill_tree(process)
    assert 37 <= reached < 60 and max(metrics(killed)) < 60
    restarted = train(args(killed))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    restart = next(i for i in range(1, len(logged)) if logged[i] <= logged[i - 1])
    assert logged[restart] == 31, "the restart should continue from the step-30 checkpoint"

    expected, got = metrics(tmp_path / "whole"), metrics(killed)
    assert sorted(got) == list(range(1, 61))
    assert [got[s]["loss"] for s in range(1, 61)] == [expected[s]["loss"] for s in range(1, 61)]
    for name in ("ema.safetensors", "model.safetensors"):
        assert_same_tensors(load_file(killed / "export" / name), load_file(tmp_path / "whole" / "export" / name))
    for rank in range(2):
        assert consumed_keys(killed, rank) == consumed_keys(tmp_path / "whole", rank)


@pytest.fixture(scope="module")
def one_rank_losses(digits_latents, tmp_path_factory) -> list[float]:
    """One rank with two data workers accumulating two micro-batches: the same samples and draws per
    step as two ranks with one worker each."""
    run_dir = tmp_path_factory.mktemp("one-rank")
    result = train(overrides(run_dir, digits_latents, data__num_workers=2, train__zero_stage=0), ranks=1)
    assert result.returncode == 0, result.stdout + result.stderr
    return [metrics(run_dir)[s]["loss"] for s in range(1, 11)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_follow_the_one_rank_trajectory(digits_latents, tmp_path, one_rank_losses, stage):
    result = train(overrides(tmp_path, digits_latents, train__zero_stage=stage))
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [metrics(tmp_path)[s]["loss"] for s in range(1, 11)]
    np.testing.assert_allclose(losses, one_rank_losses, rtol=1e-4)
    assert consumed_keys(tmp_path, 0)[1] + consumed_keys(tmp_path, 1)[1]  # both ranks took part


@pytest.mark.parametrize("stage, checkpointing", [(2, "false"), (3, "true")])
def test_compile_and_channels_last_follow_the_eager_trajectory(
    digits_latents, tmp_path, one_rank_losses, stage, checkpointing
):
    """train.compile and train.channels_last change kernels, not the model: the losses are the eager
    ones, and so are the checkpoints (parameter names), so a run may switch either way on resume."""
    run = {"train__zero_stage": stage, "model__gradient_checkpointing": checkpointing}
    fast = {"train__compile": "true", "train__channels_last": "true"}
    compiled = train(overrides(tmp_path, digits_latents, train__max_steps=5, **run, **fast))
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    eager = train(overrides(tmp_path, digits_latents, **run))
    assert eager.returncode == 0 and "at step 5" in eager.stderr, eager.stdout[-3000:] + eager.stderr[-3000:]
    losses = [metrics(tmp_path)[s]["loss"] for s in range(1, 11)]
    np.testing.assert_allclose(losses, one_rank_losses, rtol=1e-4)


def test_ema_under_zero3_equals_ema_of_gathered_weights(tmp_path):
    script = ROOT / "tests" / "scripts" / "ema_zero3.py"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "EMA ZeRO-3 matches" in result.stdout, result.stdout + result.stderr


def attempt_dir(checkpoints: Path, step: int) -> Path:
    """The directory of step's committed save attempt (train/store.py's layout)."""
    return checkpoints / f"step-{step}" / json.loads((checkpoints / f"step-{step}.commit.json").read_text())["attempt"]


def test_checkpoint_selection_skips_partial_and_corrupt_ones(digits_latents, tmp_path):
    args = overrides(tmp_path, digits_latents, train__max_steps=15, checkpoint__every=5, checkpoint__keep=3)
    assert train(args).returncode == 0
    checkpoints = tmp_path / "checkpoints"
    assert committed_steps(str(checkpoints)) == [15, 10, 5]
    (checkpoints / "step-15.commit.json").unlink()  # as if killed before the commit
    damaged = attempt_dir(checkpoints, 10) / "tensors-00001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # damaged since it was committed
    (checkpoints / "latest").write_text("step-15")  # no pointer is followed

    result = train(overrides(tmp_path, digits_latents, train__max_steps=20, checkpoint__every=5, checkpoint__keep=2))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot read checkpoint step-10" in result.stderr and "has 100 bytes, the commit says" in result.stderr
    assert "step-5 at step 5" in result.stderr
    # keep-last-2 of the committed ones: the damaged one is pruned, the uncommitted one overwritten by a new attempt.
    assert committed_steps(str(checkpoints)) == [20, 15]
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step-15", "step-20"]


def test_a_model_change_is_refused_on_resume(digits_latents, tmp_path):
    assert train(overrides(tmp_path, digits_latents, train__max_steps=2), ranks=0).returncode == 0
    result = train(overrides(tmp_path, digits_latents, train__max_steps=4, model__size="UNet-S"), ranks=0)
    assert result.returncode == 1 and "was made by another model" in result.stderr
    fresh = train(
        overrides(tmp_path, digits_latents, train__max_steps=2, model__size="UNet-S") + ["--no-resume"], ranks=0
    )
    assert fresh.returncode == 0, fresh.stderr


def test_preemption_saves_on_all_ranks_and_exits_for_requeue(digits_latents, tmp_path):
    args = overrides(tmp_path, digits_latents, train__max_steps=100000)
    process = start(args)
    wait_for_step(tmp_path, 5, process)
    workers = psutil.Process(process.pid).children()  # the ranks (their data workers are grandchildren)
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert "exitcode  : 75" in output or "exitcode: 75" in output, output
    (step,) = committed_steps(str(tmp_path / "checkpoints"))
    files = {f.name for f in attempt_dir(tmp_path / "checkpoints", step).iterdir()}
    assert files == {"state.json", "tensors-00000.safetensors", "tensors-00001.safetensors"}

    resumed = train(overrides(tmp_path, digits_latents, train__max_steps=step + 3))
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr
    assert max(metrics(tmp_path)) == step + 3


def test_single_process_preemption_exit_code(digits_latents, tmp_path):
    process = start(overrides(tmp_path, digits_latents, train__max_steps=100000), ranks=0)
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 75


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_steps_are_skipped_and_leave_weights_unchanged(tmp_path, stage):
    write_dataset(str(tmp_path / "nan"), [40, 40], shape=(3, 8, 8), mean=float("nan"), num_classes=10)
    args = overrides(
        tmp_path / "run", tmp_path / "nan", train__max_steps=4, train__zero_stage=stage, train__max_skipped_steps=100
    )
    result = train(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert metrics(tmp_path / "run")[4]["skipped_steps"] == 4
    from diffusion_dist.models import build_unet

    torch.manual_seed(0)
    initial = build_unet("UNet-T", 3, 10, learn_sigma=True).state_dict()
    assert_same_tensors(load_file(tmp_path / "run" / "export" / "model.safetensors"), initial)
    assert_same_tensors(load_file(tmp_path / "run" / "export" / "ema.safetensors"), initial)

    aborted = train(
        overrides(
            tmp_path / "run2",
            tmp_path / "nan",
            train__max_steps=10,
            train__zero_stage=stage,
            train__max_skipped_steps=3,
        )
    )
    assert aborted.returncode != 0 and "3 consecutive steps had a non-finite loss" in aborted.stderr


@pytest.fixture(scope="module")
def trained_export(digits_latents, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sample-run")
    assert train(overrides(run_dir, digits_latents, train__max_steps=5), ranks=0).returncode == 0
    return run_dir


def run_sample(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.sample", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sample_cli_writes_a_grid_and_npz_deterministically(trained_export, tmp_path):
    from PIL import Image

    common = [trained_export, "--classes", "0,3", "--per-class", 3, "--steps", 5, "--cfg-scale", 2, "--sampler"]
    assert run_sample(*common, "ddpm", "--seed", 1, "--out", tmp_path / "a").returncode == 0
    assert run_sample(*common, "ddpm", "--seed", 1, "--out", tmp_path / "b").returncode == 0
    assert run_sample(*common, "ddpm", "--seed", 2, "--out", tmp_path / "c").returncode == 0
    assert run_sample(*common, "ddim", "--seed", 1, "--out", tmp_path / "d").returncode == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in "abc")
    assert a["images"].shape == (6, 8, 8, 3) and a["images"].dtype == np.uint8
    assert a["labels"].tolist() == [0, 0, 0, 3, 3, 3]
    assert np.array_equal(a["images"], b["images"]) and not np.array_equal(a["images"], c["images"])
    layout = grid_layout(6, 8, 8, rows=2, labels=["0", "3"])  # the labelled grid: 8 px cells enlarged to 64
    assert layout.factor == 8 and Image.open(tmp_path / "a.png").size == layout.shape[1::-1]
    assert np.load(tmp_path / "d.npz")["images"].shape == (6, 8, 8, 3)
    bad = run_sample(trained_export, "--classes", "12", "--out", tmp_path / "e")
    assert bad.returncode == 2 and "outside [0, 10)" in bad.stderr


def test_offline_export_equals_the_live_one(trained_export, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch.export", str(trained_export), "--out", str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_same_tensors(
        load_file(tmp_path / "ema.safetensors"), load_file(trained_export / "export" / "ema.safetensors")
    )


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_keeps_fp32_weights_and_resumes_bit_identically(digits_latents, tmp_path, stage):
    """bf16 is autocast over fp32 parameters: the export (trained and EMA weights) holds fp32 values that
    bf16 cannot represent, and a run resumed from a step-3 checkpoint follows the uninterrupted one."""
    args = dict(train__precision="bf16", train__zero_stage=stage, checkpoint__every=3)
    whole = train(overrides(tmp_path / "whole", digits_latents, train__max_steps=6, **args))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert train(overrides(tmp_path / "split", digits_latents, train__max_steps=3, **args)).returncode == 0
    resumed = train(overrides(tmp_path / "split", digits_latents, train__max_steps=6, **args))
    assert resumed.returncode == 0 and "at step 3" in resumed.stderr, resumed.stderr[-3000:]

    losses = [metrics(tmp_path / "whole")[s]["loss"] for s in range(1, 7)]
    assert np.isfinite(losses).all() and [metrics(tmp_path / "split")[s]["loss"] for s in range(1, 7)] == losses
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(tmp_path / "whole" / "export" / name)
        assert_same_tensors(load_file(tmp_path / "split" / "export" / name), weights)
        trained = weights["input_conv.weight"]
        assert trained.dtype == torch.float32 and not torch.equal(trained, trained.bfloat16().float()), name


def test_ranks_fall_back_together_when_one_ranks_state_is_damaged(digits_latents, tmp_path):
    assert train(overrides(tmp_path, digits_latents, train__max_steps=10, checkpoint__every=5)).returncode == 0
    damaged = attempt_dir(tmp_path / "checkpoints", 10) / "tensors-00001.safetensors"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size: only the commit's sha256 tells
    result = train(overrides(tmp_path, digits_latents, train__max_steps=12, checkpoint__every=5))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[10:] == [6, 7, 8, 9, 10, 11, 12]  # both ranks went back to step-5


def test_no_resume_sets_old_checkpoints_aside(digits_latents, tmp_path):
    args = dict(checkpoint__every=5, checkpoint__keep=1)
    assert train(overrides(tmp_path, digits_latents, train__max_steps=20, **args), ranks=0).returncode == 0
    fresh = train(overrides(tmp_path, digits_latents, train__max_steps=10, **args) + ["--no-resume"], ranks=0)
    assert fresh.returncode == 0, fresh.stderr
    assert committed_steps(str(tmp_path / "checkpoints")) == [10]
    (aside,) = tmp_path.glob("checkpoints.before-*")
    assert committed_steps(str(aside)) == [20]
