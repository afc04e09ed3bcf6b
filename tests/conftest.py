"""Shared test setup: CPU-only DeepSpeed, deterministic torch, real services on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# pytest-xdist workers share the cores: each worker, and every process it starts, gets its share of
# intra-op threads instead of one per core (which oversubscribes the machine and slows both).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).parents[1]

# Canary credentials: tests plant them and check they appear in nothing that is written or logged.
CANARY_KEY_ID = "AKIACANARYKEYID00001"
CANARY_SECRET = "canary-secret-4f1c9e"


def require_service(available: bool, reason: str) -> None:
    """Skip a test whose service is missing; in CI (DIFFUSION_DIST_REQUIRE_SERVICES=1) fail instead."""
    if available:
        return
    if os.environ.get("DIFFUSION_DIST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


# The files that take longest (a demo trains for minutes), started first: on pytest-xdist workers the
# suite lasts as long as the worker that ends last, and a long file begun late runs on alone.
LONGEST_FIRST = ("test_demo.py", "test_train.py", "test_slurm.py", "test_text_train.py", "test_tracking.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and deterministic kernels."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def single_rank_group(monkeypatch):
    """A gloo process group of one rank in the test process (made once), for in-process DeepSpeed
    engines. The variables DeepSpeed reads are set for the test only: subprocesses started by other
    tests (torchrun, SLURM) must not inherit RANK=0."""
    import torch.distributed as dist

    from diffusion_dist.distributed import ProcessInfo, init_process_group

    port = free_port()
    for name, value in dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(name, str(value))
    if not dist.is_initialized():
        init_process_group(ProcessInfo(0, 1, 0, "127.0.0.1", port, "single"), torch.device("cpu"))


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on loopback in its own process, reached through s3fs's endpoint URL."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        require_service(False, "moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    if not wait_for_port(port, process):
        process.kill()
        require_service(False, f"moto server did not start on 127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; the AWS credential variables hold canaries (moto accepts any credentials)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return S3(s3_server, bucket)


@pytest.fixture(scope="session")
def digits_latents(tmp_path_factory) -> Path:
    """scikit-learn's digits encoded with the pixel codec at 8x8: 1797 labelled latents in 12 shards."""
    from data_tools import encode_latents
    from data_tools.make_digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images")
    arguments = ["--input", str(root / "images"), "--output", str(root / "latents"), "--vae", "pixel"]
    arguments += ["--resolution", "8", "--shard-size", "150", "--num-workers", "1"]
    assert encode_latents.main(arguments) == 0
    return root / "latents"


@pytest.fixture(scope="session")
def digit_weights(tmp_path_factory) -> Path:
    """Weights of tests.fid_features.DigitFeatures fitted to the digits: features for FID, a judge of samples."""
    from tests.fid_features import train_digit_features

    return train_digit_features(tmp_path_factory.mktemp("features") / "digits.pt")


class MlflowServer:
    """A real `mlflow server` on loopback: sqlite backend, artifacts proxied into a local folder.

    stop() kills it (and the workers it spawned) like a crash; start() brings it back on the same
    port with the same data.
    """

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        require_service(False, f"mlflow server did not start on {self.uri} (see {self.root / 'server.log'})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server, uvicorn and its job runner
            self.process.wait(timeout=30)
        self.process = None

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
