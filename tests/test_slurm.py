"""slurm/train.sh, slurm/encode_latents.sh and launch.submit on a real SLURM cluster that
tests/slurm_cluster.sh starts on this host (slurmctld + two `slurmd -N`, 2 nodes x 1 CPU task)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_dist.train import checkpoint
from tests.conftest import ROOT, require_service
from tests.test_tracking import experiment_runs, metric_steps, wait_until
from tests.test_train import ENV, metrics, overrides

pytestmark = pytest.mark.slow  # every test here starts processes

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# 2 nodes x 1 CPU task; sbatch's #SBATCH GPU defaults do not fit the test cluster.
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Jobs run `python` from PATH: this interpreter's, whether or not its venv was activated.
        path = f"{Path(sys.executable).parent}:{ENV['PATH']}"
        self.env = {**ENV, "SLURM_CONF": str(directory / "slurm.conf"), "PATH": path}

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr}")
        return done.stdout

    def sbatch(self, *arguments: str, env: dict | None = None) -> str:
        done = subprocess.run(
            ["sbatch", "--parsable", *arguments],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's view of a job (kept for MinJobAge after it ends): JobState, ExitCode, Restarts, ..."""
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, states: set[str] = FINISHED, timeout: float = 600) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not reach {states}: {self.job(job_id)}")

    def wait_restarted(self, job_id: str, restarts: int, timeout: float = 180) -> None:
        """A requeued job running again: SLURM holds it until the credentials of its previous run
        expire (AuthInfo=cred_expire, 10 s on the test cluster)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if int(job["Restarts"]) == restarts and job["JobState"] in {"RUNNING", *FINISHED}:
                assert job["JobState"] in ("RUNNING", "COMPLETED"), job
                return
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not start again: {self.job(job_id)}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    available = shutil.which("slurmctld") and shutil.which("munged") and os.geteuid() == 0
    require_service(bool(available), "SLURM test cluster needs root and Debian's slurm-wlm + munge (see .ci/run)")
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "start", str(directory)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    require_service(started.returncode == 0, f"the SLURM test cluster did not start: {started.stderr[-2000:]}")
    yield Cluster(directory)
    subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "stop", str(directory)], timeout=60)


def train_overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    """tests/test_train.py's small run, with MLflow on and metrics every 5 steps."""
    extra = {"tracking__enabled": "true", "tracking__log_every": 5, "checkpoint__every": 20, **extra}
    return overrides(run_dir, data, **extra)


def sbatch_train(slurm: Cluster, log: Path, args: list[str], tracking_uri: str) -> str:
    """train.sh on 2 nodes x 1 CPU task; the tracking server reaches the ranks through the environment."""
    arguments = [*CPU_JOB, f"--output={log}", "slurm/train.sh", "configs/demo.yaml", *args]
    return slurm.sbatch(*arguments, env={"MLFLOW_TRACKING_URI": tracking_uri})


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(checkpoint.committed_steps(str(run_dir / "checkpoints")))


def test_train_sh_runs_one_rank_per_node(slurm, digits_latents, mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    args = train_overrides(
        run_dir, digits_latents, train__max_steps=20, checkpoint__every=10, tracking__experiment="sbatch"
    )
    log = tmp_path / "job.out"
    job_id = sbatch_train(slurm, log, args, mlflow_server.uri)
    job = slurm.wait(job_id)
    output = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output
    assert f"job {job_id} start 0 on node[1-2]: 2 ranks, master node1:" in output
    for rank in (0, 1):  # both ranks took part: each consumed its own share of every step
        assert (run_dir / "logs" / f"keys-rank{rank}.txt").read_text().count("\n") == 20 * 8
    assert committed_steps(run_dir) == [10, 20] and (run_dir / "export" / "ema.safetensors").exists()
    (run,) = experiment_runs(mlflow_server.client(), "sbatch")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert run.data.tags["slurm_job_id"] == job_id


def test_train_sh_requeues_after_the_time_limit_signal_and_on_scontrol_requeue(
    slurm, digits_latents, mlflow_server, tmp_path
):
    """Two interruptions of one job: SIGUSR1 (what --signal sends before the time limit: the ranks
    save and exit 75, train.sh requeues the job) and `scontrol requeue` (SIGTERM: the ranks save,
    SLURM requeues). Each start resumes from the newest checkpoint; one MLflow run throughout."""
    run_dir = tmp_path / "run"
    args = train_overrides(run_dir, digits_latents, train__max_steps=400, tracking__experiment="requeue")
    log = tmp_path / "job.out"
    job_id = sbatch_train(slurm, log, args, mlflow_server.uri)

    def saved() -> list[int]:
        return [int(s) for s in re.findall(r"preempted: saved step (\d+)", log.read_text())]

    def resumed() -> list[int]:
        return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log.read_text())]

    wait_until(lambda: committed_steps(run_dir), timeout=300, what="a first checkpoint")
    slurm.run("scancel", "--signal=USR1", job_id)
    slurm.wait_restarted(job_id, restarts=1)
    wait_until(resumed, timeout=300, what="the first resume")
    assert "requeueing job" in log.read_text()

    wait_until(lambda: max(committed_steps(run_dir)) > resumed()[0], timeout=300, what="a checkpoint after the resume")
    slurm.run("scontrol", "requeue", job_id)
    slurm.wait_restarted(job_id, restarts=2)
    job = slurm.wait(job_id)
    output = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output
    # Both interruptions saved at the step they came (SIGTERM reaches the data workers too, which
    # must outlive it), and each start resumed from exactly that save.
    assert len(saved()) == 2 and resumed() == saved(), output
    assert 0 < saved()[0] < saved()[1] < 400
    assert max(metrics(run_dir)) == 400 and (run_dir / "export" / "ema.safetensors").exists()

    client = mlflow_server.client()
    (run,) = experiment_runs(client, "requeue")  # one run across three starts
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "2"
    assert set(metric_steps(client, run.info.run_id)) == set(range(5, 401, 5))


def test_submitit_job_checkpoints_requeues_and_finishes(slurm, digits_latents, tmp_path):
    import submitit

    run_dir = tmp_path / "run"
    args = train_overrides(run_dir, digits_latents, train__max_steps=400, tracking__enabled="false")
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.submit",
            "configs/demo.yaml",
            *args,
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--time",
            "30",
            "--cluster",
            "slurm",
        ],
        cwd=ROOT,
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"submitted job (\d+) \(slurm, 2 ranks\)", submit.stdout).group(1)
    assert f"submitit/{job_id}/" in submit.stdout  # the log paths

    wait_until(lambda: committed_steps(run_dir), timeout=300, what="a first checkpoint")
    slurm.run("scancel", "--signal=USR2", job_id)  # what submitit's --signal sends before the time limit
    slurm.wait_restarted(job_id, restarts=1)
    job = slurm.wait(job_id)
    logs = "".join(p.read_text() for p in (run_dir / "submitit" / job_id).glob("*.out"))
    logs += "".join(p.read_text() for p in (run_dir / "submitit" / job_id).glob("*.err"))
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), logs
    saved = [int(s) for s in re.findall(r"preempted: saved step (\d+)", logs)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", logs)]
    assert len(saved) == 1 and resumed == saved and 0 < saved[0] < 400, logs
    assert "requeueing job" in logs
    assert max(metrics(run_dir)) == 400 and (run_dir / "export" / "ema.safetensors").exists()
    assert submitit.SlurmJob(run_dir / "submitit" / "%j", job_id).result() == 0


def test_encode_array_job_writes_the_same_dataset_as_one_run(slurm, digits_latents, tmp_path):
    """2 array tasks + the finalize job vs the single-process encoding of the same digits."""
    output = tmp_path / "latents"
    arguments = ["--input", str(digits_latents.parent / "images"), "--output", str(output), "--vae", "pixel"]
    arguments += ["--resolution", "8", "--shard-size", "150", "--num-workers", "1"]
    log = tmp_path / "encode-%a.out"
    array_id = slurm.sbatch(
        "--array=0-1",
        "--gpus-per-task=0",
        "--cpus-per-task=1",
        f"--output={log}",
        "slurm/encode_latents.sh",
        *arguments,
    )
    for task in (0, 1):
        job = slurm.wait(f"{array_id}_{task}")
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (tmp_path / f"encode-{task}.out").read_text()
    finalize_id = re.search(r"finalize job (\d+)", (tmp_path / "encode-0.out").read_text()).group(1)
    job = slurm.wait(finalize_id)
    finalize_log = tmp_path / f"slurm-encode-latents-finalize-{finalize_id}.out"
    assert job["JobState"] == "COMPLETED" and "finalizing after array job" in finalize_log.read_text(), job

    expected = sorted(p.name for p in digits_latents.iterdir() if p.is_file())
    assert sorted(p.name for p in output.iterdir() if p.is_file()) == expected
    for name in expected:
        assert (output / name).read_bytes() == (digits_latents / name).read_bytes(), name


# Bad input stops before sbatch (launch.submit) or before srun (train.sh): fake sbatch and srun on
# PATH record whether they were called. These need no cluster.


@pytest.fixture
def recorder(tmp_path) -> tuple[dict, Path]:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for program in ("sbatch", "srun"):
        (bin_dir / program).write_text(f'#!/bin/sh\necho "{program} $*" >> {calls}\n')
        (bin_dir / program).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}, calls


def test_submit_dry_run_prints_the_config_and_sbatch_flags(recorder):
    env, calls = recorder
    arguments = [
        "configs/demo.yaml",
        "train.max_steps=7",
        "train.micro_batch_size=8",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "launch.submit", *arguments, "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "  max_steps: 7\n" in done.stdout and "# 8 ranks; sbatch parameters:" in done.stdout
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@300", "--requeue"):
        assert f"#SBATCH {flag}\n" in done.stdout
    assert not calls.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["configs/missing.yaml"], "does not exist"),
        (["configs/demo.yaml", "train.bogus=1"], "unknown key train.bogus"),
        (["configs/demo.yaml", "--nodes", "3", "--gpus-per-node", "0"], "must divide train.global_batch_size"),
        (["configs/demo.yaml", "--gpus-per-node", "8", "--tasks-per-node", "4"], "one rank per GPU"),
    ],
)
def test_submit_refuses_bad_input_before_sbatch(recorder, arguments, message):
    env, calls = recorder
    done = subprocess.run(
        [sys.executable, "-m", "launch.submit", *arguments, "--cluster", "slurm"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not calls.exists()


@pytest.mark.parametrize(
    "arguments, slurm_env, message",
    [
        (["configs/missing.yaml"], {}, "config file 'configs/missing.yaml' not found"),
        (["configs/demo.yaml", "train.bogus=1"], {}, "unknown key train.bogus"),
        (["configs/demo.yaml"], {"SLURM_NTASKS": "3"}, "does not run on 3 ranks"),
        (["configs/demo.yaml"], {"SLURM_GPUS_PER_NODE": "a100:8", "SLURM_NTASKS_PER_NODE": "4"}, "--gpus-per-node=8"),
    ],
)
def test_train_sh_refuses_bad_input_before_srun(recorder, arguments, slurm_env, message):
    """train.sh run as SLURM would, with the allocation's variables; a fake srun records any launch."""
    env, calls = recorder
    allocation = {
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
    }
    done = subprocess.run(
        ["bash", "slurm/train.sh", *arguments],
        cwd=ROOT,
        env={**env, **allocation, **slurm_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not calls.exists()
