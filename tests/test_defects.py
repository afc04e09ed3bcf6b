"""Regressions of issue 17's adversarial probe: credentials inside URLs, and bad input or a full disk
that ended in a traceback instead of an exit code and a message naming the input."""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.conftest import CANARY_KEY_ID, CANARY_SECRET, ROOT, free_port, require_service, wait_for_port
from tests.latent_data import write_dataset

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SECRETS = (CANARY_KEY_ID, CANARY_SECRET)
# A URL of every kind the probe found written in plain text: user:password@, a presigned query.
REFERENCE = f"https://{CANARY_KEY_ID}:{CANARY_SECRET}@stats.example/ref.npz?X-Amz-Signature={CANARY_SECRET}"
SMALL = ["data.num_workers=0", "train.global_batch_size=8", "train.micro_batch_size=8", "tracking.sample_every=0"]


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def grep_tree(root: Path, *secrets: str) -> list[str]:
    """Files under root whose bytes contain any of the secrets."""
    return [str(p) for p in root.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


class Recorder(SimpleHTTPRequestHandler):
    """Serves a folder (GET/HEAD) to requests with the expected Basic credentials; records every
    Authorization header. With no folder it answers 503, like an MLflow server that is down."""

    def __init__(self, *args, expected: str, seen: list, **kwargs):
        self.expected, self.seen = expected, seen
        super().__init__(*args, **kwargs)

    def _allowed(self) -> bool:
        self.seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != self.expected:
            self.send_error(401)
            return False
        if self.directory is None or not Path(self.directory).is_dir():
            body = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return False
        return True

    def do_GET(self):
        if self._allowed():
            super().do_GET()

    def do_HEAD(self):
        if self._allowed():
            super().do_HEAD()

    def do_POST(self):
        self._allowed()

    def log_message(self, *args):
        pass


class AuthServer:
    """An HTTP server on loopback that needs user:password (Basic auth); `uri(user, password)` reaches it."""

    def __init__(self, directory: Path | None, user: str, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.seen: list[str | None] = []
        handler = partial(Recorder, expected=expected, seen=self.seen, directory=str(directory or "/nonexistent"))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.expected = expected
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def uri(self, user: str, password: str, path: str = "") -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def latents(tmp_path) -> Path:
    write_dataset(str(tmp_path / "data" / "latents"), [16, 16], shape=(3, 8, 8), num_classes=10)
    return tmp_path / "data" / "latents"


# 1. Credentials inside URLs: redacted wherever the config is written or printed, used where needed.


def test_print_config_and_submit_dry_run_show_no_credentials_in_urls():
    overrides = [
        f"data.url=s3://{CANARY_KEY_ID}:{CANARY_SECRET}@bucket/latents?token={CANARY_SECRET}",
        f"tracking.uri=http://trainer:{CANARY_SECRET}@mlflow.example:5000",
        f"eval.reference={REFERENCE}",
        f"data.storage_options.client_kwargs.endpoint_url=http://{CANARY_KEY_ID}:{CANARY_SECRET}@s3.example",
    ]
    printed = run_module("launch.train", "configs/demo.yaml", *overrides, "--print-config")
    dry_run = run_module("launch.submit", "configs/demo.yaml", *overrides, "--gpus-per-node", "0", "--dry-run")
    for result in (printed, dry_run):
        assert result.returncode == 0, result.stderr
        assert not any(secret in result.stdout + result.stderr for secret in SECRETS), result.stdout
        assert "url: s3://bucket/latents?<redacted>" in result.stdout
        assert "uri: http://mlflow.example:5000" in result.stdout
        assert "endpoint_url: http://s3.example" in result.stdout
    assert "#SBATCH --nodes=1" in dry_run.stdout


def test_config_errors_show_no_credentials():
    result = run_module(
        "launch.train", "configs/demo.yaml", f"data.ulr=s3://{CANARY_KEY_ID}:{CANARY_SECRET}@bucket/x", "--print-config"
    )
    assert result.returncode == 2 and "unknown key data.ulr; did you mean data.url?" in result.stderr
    assert "override 'data.ulr=s3://bucket/x'" in result.stderr
    assert not any(secret in result.stderr for secret in SECRETS) and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("tracking", ["embedded", "server"])
def test_a_run_reaches_its_servers_with_url_credentials_and_writes_none(latents, tmp_path, tracking):
    """Data over HTTP that needs the user:password of data.url; MLflow either in run.dir (embedded store)
    or on a server that needs the user:password of tracking.uri. Both get the credentials; no file under
    run.dir (config.yaml, checkpoints, export, MLflow's store), no output line holds them."""
    data = AuthServer(latents.parent, "reader", CANARY_SECRET)
    mlflow = AuthServer(None, "trainer", CANARY_SECRET)  # answers 503: the tracker retries, training goes on
    run_dir = tmp_path / "run"
    args = [
        "configs/demo.yaml",
        *SMALL,
        f"run.dir={run_dir}",
        f"data.url={data.uri('reader', CANARY_SECRET, '/latents')}",
        f"eval.reference={REFERENCE}",
        "train.max_steps=2",
        "checkpoint.every=1",
        "tracking.log_every=1",
    ]
    if tracking == "server":
        args += [f"tracking.uri={mlflow.uri('trainer', CANARY_SECRET)}", "tracking.flush_timeout=1"]
    env = {"MLFLOW_TRACKING_URI": ""}
    try:
        result = run_module("launch.train", *args, env=env)
    finally:
        data.close()
        mlflow.close()
    assert result.returncode == 0, result.stderr
    assert data.expected in data.seen and set(data.seen) == {data.expected}  # every read with the URL's credentials
    assert (mlflow.expected in mlflow.seen) == (tracking == "server")
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*.commit.json")) == [
        "step-1.commit.json",
        "step-2.commit.json",
    ]
    if tracking == "embedded":
        assert (run_dir / "mlflow" / "mlflow.db").is_file()
        (logged,) = (run_dir / "mlflow" / "artifacts").rglob("config.yaml")
        assert logged.read_text() == (run_dir / "config.yaml").read_text()
    assert f"url: http://127.0.0.1:{data.port}/latents\n" in (run_dir / "config.yaml").read_text()
    commit = json.loads((checkpoints / "step-2.commit.json").read_text())
    saved = json.loads((checkpoints / "step-2" / commit["attempt"] / "state.json").read_text())
    assert saved["config"]["eval"]["reference"] == "https://stats.example/ref.npz?<redacted>"
    assert grep_tree(run_dir, *SECRETS) == []
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS)


def test_the_tracker_stores_no_url_credentials_in_params_tags_or_run_name(tmp_path):
    """The embedded store (sqlite and artifacts) after a run opened with secrets in params, tags and
    its name: none of them is stored."""
    from diffusion_dist.train.tracking import Tracker, local_store

    uri, artifacts = local_store(tmp_path)
    tracker = Tracker(
        uri,
        "canaries",
        f"run-{REFERENCE}",
        params={"eval.reference": REFERENCE},
        tags={"source": REFERENCE},
        config_yaml=f"reference: {REFERENCE}\n".replace(REFERENCE, "https://stats.example/ref.npz"),
        artifact_root=artifacts,
    )
    assert tracker.close("FINISHED", timeout=120) == {"undelivered": 0, "dropped": 0, "failed": 0}
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.params["eval.reference"] == "https://stats.example/ref.npz?<redacted>"
    assert run.data.tags["source"] == "https://stats.example/ref.npz?<redacted>"
    assert grep_tree(tmp_path / "mlflow", *SECRETS) == []


# 7. Bad input: exit 2 and a message that names it; a full disk: exit 1 and "no space left on".


@pytest.fixture(scope="module")
def moto_with_auth(tmp_path_factory):
    """A moto S3 server that checks signatures (IAM auth on): a bucket `data-bucket` and an access key."""
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        require_service(False, "moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto-auth") / "moto.log", "w")
    # The first requests need no auth: they create the user, its policy and its key.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, env=env
    )
    if not wait_for_port(port, process):
        process.kill()
        require_service(False, f"moto server did not start on 127.0.0.1:{port}")
    endpoint = f"http://127.0.0.1:{port}"
    anyone = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    iam = boto3.client("iam", **anyone)
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    ).create_bucket(Bucket="data-bucket")
    yield endpoint, key["AccessKeyId"]
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.mark.slow
def test_a_wrong_s3_secret_is_exit_2_naming_the_url(moto_with_auth, tmp_path):
    endpoint, key_id = moto_with_auth
    options = f"{{key: {key_id}, secret: {CANARY_SECRET}, client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    result = run_module(
        "launch.train", "configs/demo.yaml", *SMALL, f"run.dir={tmp_path / 'run'}",
        "data.url=s3://data-bucket/latents", f"data.storage_options={options}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "error: data.url=s3://data-bucket/latents: access denied" in result.stderr
    assert "check the credentials" in result.stderr
    assert "Traceback" not in result.stderr and CANARY_SECRET not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.slow
def test_an_unreachable_data_endpoint_is_the_requeue_code_naming_the_url(tmp_path):
    """An outage (nothing answers, through every retry) is not a mistake in the config: exit 75, which
    slurm/train.sh requeues, not 2 (issue 17, defect 5)."""
    url = f"http://127.0.0.1:{free_port()}/latents"  # nothing listens there
    result = run_module("launch.train", "configs/demo.yaml", *SMALL, f"run.dir={tmp_path / 'run'}", f"data.url={url}")
    assert result.returncode == 75, result.stderr
    assert f"error: data.url={url}: storage unreachable" in result.stderr and "failed after 5 attempts" in result.stderr
    assert "requeues the job" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("name", ["config.yaml", pytest.param("metrics.jsonl", marks=pytest.mark.slow)])
def test_a_full_disk_says_so(latents, tmp_path, name):
    """/dev/full answers every write with ENOSPC: run.dir/<name> pointing there is a full disk."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to("/dev/full")
    result = run_module(
        "launch.train", "configs/demo.yaml", *SMALL, f"run.dir={run_dir}", f"data.url={latents}",
        "train.max_steps=1", "tracking.log_every=1", "tracking.enabled=false",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"error: no space left on {run_dir.resolve()}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("filename", [None, "export/.ema.safetensors.partial"])
def test_a_full_disk_during_training_names_the_file_or_run_dir(latents, tmp_path, monkeypatch, capsys, filename):
    """Any ENOSPC out of train() (here: the export's write) is reported plainly, with the file when known."""
    import diffusion_dist.train.loop as loop
    from launch import train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(loop, "train", full)
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(name, value)  # main() sets them; restored after the test
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    assert train.main(["configs/demo.yaml", *SMALL, f"run.dir={run_dir}", f"data.url={latents}"]) == 1
    where = filename or run_dir.resolve()
    assert f"error: no space left on {where}; free space there" in capsys.readouterr().err


# launch.sample and exports.


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """An untrained UNet-T export (3×8×8 pixel latents, 10 classes, 50 steps): enough to load and refuse."""
    from diffusion_dist.config import load_config
    from diffusion_dist.export import ExportInfo, write_export

    config = load_config(
        None, ["model.size=UNet-T", "model.num_classes=10", "diffusion.num_timesteps=50", "diffusion.sample_steps=5"]
    )
    codec = {"name": "pixel", "model": None, "subfolder": None, "scaling_factor": 1.0, "shift_factor": 0.0}
    manifest = {"codec": {**codec, "latent_channels": 3, "downsample": 1}, "num_samples": 10}
    info = ExportInfo.from_config(config, manifest, (3, 8, 8))
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("export")
    return write_export(directory, info.build_model().state_dict(), info)


def sample(*args: str) -> int:
    from launch import sample as launch_sample

    return launch_sample.main([*map(str, args)])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--cfg-scale", "nan"], "argument --cfg-scale: nan: must be a finite number >= 0"),
        (["--cfg-scale", "inf"], "argument --cfg-scale: inf: must be a finite number >= 0"),
        (["--cfg-scale", "-1"], "argument --cfg-scale: -1: must be a finite number >= 0"),
        (["--cfg-scale", "lots"], "argument --cfg-scale: 'lots' is not a number"),
        (["--classifier-scale", "nan"], "argument --classifier-scale: nan: must be a finite number >= 0"),
        (["--steps", "0"], "argument --steps: 0: must be >= 1"),
        (["--steps", "-3"], "argument --steps: -3: must be >= 1"),
        (["--per-class", "0"], "argument --per-class: 0: must be >= 1"),
        (["--seed", "-1"], "argument --seed: -1: must be >= 0"),
    ],
)
def test_sample_refuses_bad_numbers_before_loading(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        sample(tmp_path / "no-export", *arguments)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--steps", "51"], "--steps 51: must lie in [1, 50]"),
        (["--classes", "1,x"], "--classes '1,x': give comma-separated class ids"),
        (["--classes", "10"], "--classes [10] outside [0, 10)"),
        (["--device", "gpu0"], "--device gpu0: "),
    ],
)
def test_sample_refuses_bad_input_naming_it(export_dir, tmp_path, capsys, arguments, message):
    assert sample(export_dir, *arguments, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err
    assert not list(tmp_path.glob("s.*"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "other weights"])
def test_a_damaged_export_is_exit_2_naming_the_file(export_dir, tmp_path, capsys, damage):
    from safetensors.torch import save_file

    broken = tmp_path / "export"
    broken.mkdir()
    (broken / "config.json").write_bytes((export_dir / "config.json").read_bytes())
    weights = (export_dir / "ema.safetensors").read_bytes()
    if damage == "truncated":
        (broken / "ema.safetensors").write_bytes(weights[: len(weights) // 2])
    elif damage == "empty":
        (broken / "ema.safetensors").write_bytes(b"")
    else:
        save_file({"time_embed.0.weight": torch.zeros(2, 2)}, broken / "ema.safetensors")
    assert sample(broken, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert f"error: {broken / 'ema.safetensors'} " in err and "export the run again" in err
    assert "Traceback" not in err


def test_sample_steps_default_comes_from_the_export(export_dir, tmp_path, capsys):
    """No --steps: the export's diffusion.sample_steps (5), written and run; 1 sample per class of 2."""
    assert sample(export_dir, "--classes", "0,1", "--per-class", "1", "--out", tmp_path / "s", "--device", "cpu") == 0
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s.npz").is_file()


# launch.submit: integer arguments.


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tasks-per-node", "0", "--gpus-per-node", "0"], "--tasks-per-node must be >= 1"),
        (["--signal-delay", "0"], "--signal-delay must be >= 1"),
        (["--time", "4", "--signal-delay", "300"], "--signal-delay 300 s is not shorter than --time 4 min"),
        (["--nodes", "-1"], "--nodes must be >= 1"),
    ],
)
def test_submit_refuses_bad_counts(capsys, arguments, message):
    from launch import submit

    assert submit.main(["configs/demo.yaml", *arguments, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
