"""One failing rank ends the job (train/watchdog.py): a rank that raises in a step, while saving or
during start-up, or that is killed, ends every rank within seconds with a non-zero exit code and its
error in the log. Faults are injected from outside: a sitecustomize.py on PYTHONPATH patches the
trainer in the process whose RANK is FAULT_RANK, and writes the time of the fault to FAULT_FILE."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from diffusion_dist.config import ConfigError, load_config
from diffusion_dist.train.checkpoint import committed_steps
from diffusion_dist.train.watchdog import Watchdog
from tests.conftest import ROOT, free_port
from tests.test_train import ENV, kill_tree, overrides, start, wait_for_step

BOUND_S = 60  # every rank ends this long after the fault, at most

SITECUSTOMIZE = """
import os, time

def _fault(error):
    with open(os.environ["FAULT_FILE"], "w") as f:
        f.write(repr(time.time()))
    raise error

if os.environ.get("FAULT") and os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
    where, _, at = os.environ["FAULT"].partition(":")
    if where == "step":  # a data error in the k-th optimizer step
        from diffusion_dist.train.engine import Engine

        _step, _calls = Engine.step, [0]

        def step(self):
            _calls[0] += 1
            if _calls[0] == int(at):
                _fault(RuntimeError(f"injected data error at step {at}"))
            return _step(self)

        Engine.step = step
    elif where == "save":  # out of memory while this rank writes its part of a checkpoint
        import torch
        from diffusion_dist.train import checkpoint

        def save_file(*args, **kwargs):
            _fault(torch.OutOfMemoryError("injected: out of memory while writing the checkpoint"))

        checkpoint.save_file = save_file
    elif where == "start":  # before the loop: this rank cannot read the dataset
        from diffusion_dist.data.manifest import DatasetError
        from diffusion_dist.data.stream import LatentLoader

        def __init__(self, *args, **kwargs):
            _fault(DatasetError("injected: manifest.json unreadable on this rank"))

        LatentLoader.__init__ = __init__
"""


def fault_env(tmp_path: Path, fault: str, rank: int = 1) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FAULT": fault, "FAULT_RANK": str(rank), "FAULT_FILE": str(tmp_path / "fault-time")}


def start_ranks(args: list[str], env: dict[str, str], log_dir: Path, ranks: int = 2) -> list[subprocess.Popen]:
    """`ranks` processes of launch.train as srun starts them: no agent that ends the others when one fails."""
    port = free_port()
    processes = []
    for rank in range(ranks):
        variables = dict(RANK=rank, WORLD_SIZE=ranks, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "launch.train", "configs/demo.yaml", *args],
                cwd=ROOT,
                env={**ENV, **env, **{k: str(v) for k, v in variables.items()}},
                stdout=(log_dir / f"rank{rank}.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float = 300) -> list[float]:
    """The time at which each process ended (killing all of them if one is still running at `timeout`)."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(processes) and time.monotonic() < deadline:
        for i, process in enumerate(processes):
            if i not in ended and process.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.1)
    for i, process in enumerate(processes):
        if i not in ended:
            kill_tree(process)
            ended[i] = float("inf")
    return [ended[i] for i in range(len(processes))]


def fault_time(tmp_path: Path) -> float:
    return float((tmp_path / "fault-time").read_text())


def logs(tmp_path: Path) -> list[str]:
    return [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]


@pytest.mark.slow
def test_an_error_in_a_step_ends_every_rank_under_torchrun(digits_latents, tmp_path):
    """rank 1 raises in its 3rd step while rank 0 waits in the gradient all-reduce."""
    args = overrides(tmp_path / "run", digits_latents, train__max_steps=1000)
    process = start(args, env=fault_env(tmp_path, "step:3"))
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process)
    ended = time.time()
    assert process.returncode != 0, output
    assert ended - fault_time(tmp_path) < BOUND_S, output
    assert "Traceback" in output and "RuntimeError: injected data error at step 3" in output, output
    assert "rank0 diffusion_dist.train.watchdog: rank 1 failed: RuntimeError: injected data error at step 3" in output
    assert "exitcode  : 75" not in output and "exitcode: 75" not in output


@pytest.mark.slow
def test_an_out_of_memory_while_saving_ends_every_rank(digits_latents, tmp_path):
    """rank 1 runs out of memory writing its part of the step-2 checkpoint while rank 0 waits in the
    save's next collective. (A full disk is not a failure: TrainState.save skips that checkpoint.)"""
    args = overrides(tmp_path / "run", digits_latents, train__max_steps=1000, checkpoint__every=2)
    processes = start_ranks(args, fault_env(tmp_path, "save"), tmp_path)
    ended = wait_all(processes)
    rank0, rank1 = logs(tmp_path)
    assert [p.returncode for p in processes] == [1, 1], rank0 + rank1
    assert max(ended) - fault_time(tmp_path) < BOUND_S, rank0 + rank1
    error = "OutOfMemoryError: injected: out of memory while writing the checkpoint"
    assert "Traceback" in rank1 and error in rank1, rank1
    assert f"rank 1 failed: {error}; ending rank 0 with exit code 1" in rank0, rank0
    assert committed_steps(str(tmp_path / "run" / "checkpoints")) == []


@pytest.mark.slow
def test_an_error_during_start_up_ends_every_rank(digits_latents, tmp_path):
    """rank 1 cannot read the dataset (exit 2: bad data) while rank 0 goes on into DeepSpeed's set-up."""
    args = overrides(tmp_path / "run", digits_latents, train__max_steps=1000)
    processes = start_ranks(args, fault_env(tmp_path, "start"), tmp_path)
    ended = wait_all(processes)
    rank0, rank1 = logs(tmp_path)
    assert [p.returncode for p in processes] == [1, 2], rank0 + rank1
    assert max(ended) - fault_time(tmp_path) < BOUND_S, rank0 + rank1
    assert "error: injected: manifest.json unreadable on this rank" in rank1, rank1
    assert "rank 1 failed: DatasetError: injected: manifest.json unreadable on this rank" in rank0, rank0


@pytest.mark.slow
def test_a_killed_rank_ends_the_others(digits_latents, tmp_path):
    """kill -9 of rank 1 mid-run: rank 0's heartbeat breaks, it ends with 1 and leaves no data worker behind."""
    run_dir = tmp_path / "run"
    processes = start_ranks(overrides(run_dir, digits_latents, train__max_steps=1000), {}, tmp_path)
    try:
        wait_for_step(run_dir, 3, processes[0])
        workers = psutil.Process(processes[0].pid).children(recursive=True)
        assert workers, "rank 0 should have a data worker"
        processes[1].send_signal(signal.SIGKILL)
        killed = time.time()
        ended = wait_all(processes)
    finally:
        for process in processes:
            if process.poll() is None:
                kill_tree(process)
    rank0 = logs(tmp_path)[0]
    assert processes[0].returncode == 1, rank0
    assert ended[0] - killed < BOUND_S, rank0
    assert "lost the heartbeat of another rank" in rank0, rank0
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive


def test_the_timeouts_are_validated():
    config = load_config("configs/demo.yaml", ["run.collective_timeout_s=600", "run.heartbeat_timeout_s=30"])
    assert (config.run.collective_timeout_s, config.run.heartbeat_timeout_s) == (600, 30)
    with pytest.raises(ConfigError, match="run.collective_timeout_s"):
        load_config("configs/demo.yaml", ["run.collective_timeout_s=0"])
    with pytest.raises(ConfigError, match="run.heartbeat_timeout_s"):
        load_config("configs/demo.yaml", ["run.heartbeat_timeout_s=1"])


def test_one_rank_starts_no_watchdog_thread():
    threads = threading.active_count()
    watchdog = Watchdog(0, 1, timeout_s=60)
    assert threading.active_count() == threads
    watchdog.fail(RuntimeError("alone"))  # nobody to tell: returns at once
    watchdog.close()
