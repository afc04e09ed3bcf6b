"""MLflow tracking against a real `mlflow server` on loopback: what a run logs, that it never
blocks training, survives a server outage, continues the same run after kill -9, and logs no secret."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_dist.config import load_config
from diffusion_dist.train.tracking import Tracker, run_params
from tests.conftest import CANARY_KEY_ID, CANARY_SECRET, ROOT, MlflowServer, free_port
from tests.test_train import kill_tree, metrics, overrides, start, train, wait_for_step

pytestmark = pytest.mark.slow  # every test here starts processes

CANARY_PASSWORD = "canary-mlflow-password-7d2e"


def experiment_runs(client, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def metric_steps(client, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def wait_until(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def image_steps(paths: list[str]) -> list[int]:
    """Steps of the time-stepped images MLflow stores as images/<key>+step+<N>+timestamp+....png."""
    images = [p for p in paths if p.startswith("images/") and p.endswith(".png")]  # not plots/*.png
    return sorted(int(p.split("+step+")[1].split("+")[0]) for p in images)


@pytest.fixture(autouse=True)
def _mlflow_environment(monkeypatch):
    """What launch.train sets for MLflow: no HTTP retries of its own (the tracker retries), no printed URLs."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


# The Tracker on its own.


def test_tracker_logs_params_metrics_images_and_artifacts(mlflow_server, tmp_path):
    experiment = f"unit-{uuid.uuid4().hex[:8]}"
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    tracker = Tracker(
        mlflow_server.uri,
        experiment,
        "first",
        params={"model.size": "UNet-T", "train.lr": "0.0001"},
        tags={"run_dir": str(tmp_path)},
        config_yaml="model:\n  size: UNet-T\n",
    )
    for step in (10, 20, 30):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step)
    tracker.log_image(np.full((8, 16, 3), 128, np.uint8), "samples", 20)
    tracker.log_artifacts(tmp_path / "export", "export")
    assert tracker.close("FINISHED", timeout=60) == {"undelivered": 0, "dropped": 0, "failed": 0}

    client = mlflow_server.client()
    (run,) = experiment_runs(client, experiment)
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert run.data.params == {"model.size": "UNet-T", "train.lr": "0.0001"}
    assert run.data.tags["restarts"] == "0" and run.data.tags["run_dir"] == str(tmp_path)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    paths = artifact_paths(client, run.info.run_id)
    assert image_steps(paths) == [20]
    assert {"config.yaml", "export/config.json"} <= set(paths)
    assert "size: UNet-T" in Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()


def test_a_restart_continues_the_run_and_keeps_changed_params_as_tags(mlflow_server):
    experiment = f"unit-{uuid.uuid4().hex[:8]}"
    first = Tracker(mlflow_server.uri, experiment, "run", params={"world_size": "2", "train.lr": "0.0001"})
    first.log_metrics({"loss": 1.0}, 1)
    first.close("KILLED", timeout=60)

    second = Tracker(
        mlflow_server.uri,
        experiment,
        "run",
        run_id=first.run_id,
        restarts=1,
        params={"world_size": "4", "train.lr": "0.0001", "version.code": "abc"},
    )
    second.log_metrics({"loss": 0.5}, 2)
    assert second.close("FINISHED", timeout=60)["undelivered"] == 0

    client = mlflow_server.client()
    (run,) = experiment_runs(client, experiment)  # no second run
    assert second.run_id == first.run_id == run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == {"world_size": "2", "train.lr": "0.0001", "version.code": "abc"}
    assert run.data.tags["restarts"] == "1"
    assert json.loads(run.data.tags["changed_params.restart1"]) == {"world_size": "4"}
    assert metric_steps(client, run.info.run_id) == [1, 2]


def test_a_restart_without_run_id_finds_the_run_by_its_key(mlflow_server):
    """The server was unreachable until after the last checkpoint: the checkpoint has the run key only."""
    experiment = f"unit-{uuid.uuid4().hex[:8]}"
    first = Tracker(mlflow_server.uri, experiment, "run", run_key="k" * 32)
    first.close("KILLED", timeout=60)
    second = Tracker(mlflow_server.uri, experiment, "run", run_key="k" * 32, restarts=1)
    second.close("FINISHED", timeout=60)
    (run,) = experiment_runs(mlflow_server.client(), experiment)
    assert second.run_id == first.run_id == run.info.run_id and run.data.tags["restarts"] == "1"


def test_a_record_that_fails_for_good_is_dropped_and_the_rest_delivered(mlflow_server, caplog):
    caplog.set_level(logging.WARNING, logger="diffusion_dist")
    experiment = f"unit-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(mlflow_server.uri, experiment, "run")
    tracker.log_image(np.zeros((2, 2, 7)), "samples", 1)  # 7 channels: MLflow refuses it
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.close("FINISHED", timeout=60) == {"undelivered": 0, "dropped": 0, "failed": 1}
    (run,) = experiment_runs(mlflow_server.client(), experiment)
    assert run.info.status == "FINISHED" and metric_steps(mlflow_server.client(), run.info.run_id) == [1]
    assert any("image record failed for good" in r.getMessage() for r in caplog.records)


def test_an_unknown_run_id_starts_a_new_run(mlflow_server):
    experiment = f"unit-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(mlflow_server.uri, experiment, "run", run_id="0" * 32, restarts=3)
    tracker.close("FINISHED", timeout=60)
    (run,) = experiment_runs(mlflow_server.client(), experiment)
    assert tracker.run_id == run.info.run_id != "0" * 32


def test_an_unreachable_server_blocks_nothing_and_drops_beyond_the_bound(caplog):
    """Nothing listens on the port: every call returns at once; beyond max_pending records are
    dropped with one warning and counted; close() gives up after its timeout and says so."""
    caplog.set_level(logging.WARNING, logger="diffusion_dist")
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "nowhere", "run", max_pending=5)
    for step in range(100):
        tracker.log_metrics({"loss": 1.0}, step)
    counts = tracker.close("FINISHED", timeout=1)
    # Queued: the run's opening + 4 metric records + the finish mark; the other 96 were dropped.
    assert counts == {"undelivered": 6, "dropped": 96, "failed": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m for m in messages)
    assert sum("new ones are dropped" in m for m in messages) == 1
    assert any("96 records were dropped" in m for m in messages)
    assert any("6 records not delivered" in m for m in messages)
    assert tracker.run_id is None


def test_records_queued_during_an_outage_arrive_when_the_server_returns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="diffusion_dist")
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        tracker = Tracker(server.uri, "outage", "run", max_retry_delay=2.0)
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": float(step)}, step)
        client = server.client()
        wait_until(lambda: tracker.run_id and len(metric_steps(client, tracker.run_id)) == 3, what="first metrics")
        server.stop()
        for step in range(4, 11):
            tracker.log_metrics({"loss": float(step)}, step)
        time.sleep(1)  # the thread meets the outage and backs off
        server.start()
        assert tracker.close("FINISHED", timeout=120) == {"undelivered": 0, "dropped": 0, "failed": 0}
        assert metric_steps(client, tracker.run_id) == list(range(1, 11))
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "unreachable" in messages and "answers again" in messages
    finally:
        server.stop()


def test_params_are_the_redacted_config_plus_extras():
    config = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "data.url=s3://bucket/latents",
            f"data.storage_options={{key: {CANARY_KEY_ID}, secret: {CANARY_SECRET}, accountKey: {CANARY_SECRET}, "
            f"connection_string: 'AccountName=a;AccountKey={CANARY_SECRET}', "
            f"headers: {{Authorization: {CANARY_SECRET}}}, "
            f'client_kwargs: {{endpoint_url: "http://u:{CANARY_SECRET}@127.0.0.1:9"}}}}',
            f"tracking.uri=http://user:{CANARY_PASSWORD}@127.0.0.1:5000",
        ],
    )
    params = run_params(config, {"world_size": 2})
    assert (
        params["model.size"] == "UNet-T" and params["world_size"] == "2" and params["data.url"] == "s3://bucket/latents"
    )
    assert params["data.storage_options.key"] == params["data.storage_options.secret"] == "***"
    assert params["data.storage_options.client_kwargs.endpoint_url"] == "http://127.0.0.1:9"
    assert params["tracking.uri"] == "http://127.0.0.1:5000"
    for value in params.values():
        assert CANARY_KEY_ID not in value and CANARY_SECRET not in value and CANARY_PASSWORD not in value


# Training runs (2 CPU ranks under torchrun) against the server.


def grep_tree(root: Path, *secrets: str) -> list[str]:
    """Files under root whose bytes contain any of the secrets."""
    return [str(p) for p in root.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


def test_a_training_run_logs_everything_once_and_no_secret(mlflow_server, s3, digits_latents, tmp_path):
    """Data on S3 (moto) with canary keys in storage options and the environment, a canary MLflow
    password in the environment: one run with params, metrics at their steps, sample grids at
    theirs, the config and the export; no canary in anything the server, the run dir or the logs hold."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(digits_latents) + "/", s3.url("latents") + "/", recursive=True)
    experiment = f"train-{uuid.uuid4().hex[:8]}"
    options = f"{{key: {CANARY_KEY_ID}, secret: {CANARY_SECRET}, client_kwargs: {{endpoint_url: {s3.endpoint}}}}}"
    args = overrides(
        tmp_path / "run",
        s3.url("latents"),
        data__storage_options=options,
        train__max_steps=6,
        tracking__enabled="true",
        tracking__experiment=experiment,
        tracking__log_every=2,
        tracking__sample_every=3,
        checkpoint__every=3,
    )
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "MLFLOW_TRACKING_USERNAME": "trainer",
        "MLFLOW_TRACKING_PASSWORD": CANARY_PASSWORD,
    }
    result = train(args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    client = mlflow_server.client()
    (run,) = experiment_runs(client, experiment)
    assert run.info.status == "FINISHED"
    params = run.data.params
    manifest = json.loads((digits_latents / "manifest.json").read_text())
    ema = load_file(tmp_path / "run" / "export" / "ema.safetensors")
    assert params["world_size"] == "2" and params["model.size"] == "UNet-T"
    assert params["model.num_parameters"] == str(sum(t.numel() for t in ema.values()))
    assert params["dataset.num_samples"] == str(manifest["num_samples"]) and params["dataset.codec"] == "pixel"
    assert params["dataset.latent_shape"] == "3x8x8"
    assert params["version.torch"] == torch.__version__
    assert params["data.storage_options.secret"] == "***"
    assert run.data.tags["restarts"] == "0"
    for key in ("loss", "loss_q0", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_fraction"):
        assert metric_steps(client, run.info.run_id, key) == [2, 4, 6], key
    assert metric_steps(client, run.info.run_id, "memory/process_rss_gb") == [2, 4, 6]
    jsonl = metrics(tmp_path / "run")
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == {step: jsonl[step]["loss"] for step in (2, 4, 6)}
    paths = artifact_paths(client, run.info.run_id)
    assert image_steps(paths) == [3, 6]
    assert {"plots/loss.png", "plots/loss_by_timestep.png"} <= set(paths)  # the training curves, after each save
    assert {"config.yaml", "export/config.json", "export/ema.safetensors", "export/model.safetensors"} <= set(paths)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]

    secrets = (CANARY_KEY_ID, CANARY_SECRET, CANARY_PASSWORD)
    assert not grep_tree(mlflow_server.root, *secrets)
    assert not grep_tree(tmp_path / "run", *secrets)
    for secret in secrets:
        assert secret not in result.stdout + result.stderr
        assert all(secret not in value for value in [*params.values(), *run.data.tags.values()])


def test_training_outlives_a_server_outage_and_delivers_afterwards(digits_latents, tmp_path):
    """The server is killed mid-run: training goes on at full speed and writes its export; the
    server comes back while rank 0 waits (tracking.flush_timeout) and every metric arrives."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    run_dir = tmp_path / "run"
    args = overrides(run_dir, digits_latents, train__max_steps=200, tracking__enabled="true", tracking__uri=server.uri)
    process = start(args)
    try:
        client = server.client()
        wait_for_step(run_dir, 5, process)
        wait_until(lambda: experiment_runs(client, "demo"), what="the run on the server")
        server.stop()
        outage_from = max(metrics(run_dir))
        wait_until(lambda: (run_dir / "export" / "config.json").exists(), timeout=300, what="training to finish")
        assert process.poll() is None, "rank 0 should still be waiting to deliver"
        server.start()
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
        assert outage_from < 180, "the outage should cover most of the run"
        assert "unreachable" in output and "answers again" in output
        (run,) = experiment_runs(client, "demo")
        assert run.info.status == "FINISHED" and run.data.tags["tracking.dropped_records"] == "0"
        # At least once: a batch whose reply the crash cut off may arrive twice.
        assert set(metric_steps(client, run.info.run_id)) == set(range(1, 201))
    finally:
        if process.poll() is None:
            kill_tree(process)
        server.stop()


def test_resume_after_kill_continues_the_same_run(mlflow_server, digits_latents, tmp_path):
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    args = overrides(
        tmp_path,
        digits_latents,
        train__max_steps=40,
        checkpoint__every=20,
        tracking__enabled="true",
        tracking__uri=mlflow_server.uri,
        tracking__experiment=experiment,
        tracking__log_every=5,
        model__size="UNet-S",  # slow enough that the kill lands between the step-20 and step-40 checkpoints
    )
    process = start(args)
    client = mlflow_server.client()
    wait_for_step(tmp_path, 25, process)  # past the step-20 checkpoint
    # Kill once the steps before it have reached the server: kill -9 loses what was not delivered.
    wait_until(lambda: experiment_runs(client, experiment), what="the run on the server")
    run_id = experiment_runs(client, experiment)[0].info.run_id
    wait_until(lambda: {5, 10, 15, 20} <= set(metric_steps(client, run_id)), what="steps 5-20 on the server")
    assert process.poll() is None, "the run ended before it could be killed"
    kill_tree(process)
    killed_at = time.time() * 1000
    (killed,) = experiment_runs(client, experiment)
    assert killed.info.status == "RUNNING"

    result = train(args)
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = experiment_runs(client, experiment)  # the same run, no second one
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1"
    commit = json.loads((tmp_path / "checkpoints" / "step-40.commit.json").read_text())
    saved = json.loads((tmp_path / "checkpoints" / "step-40" / commit["attempt"] / "state.json").read_text())
    assert saved["tracking"]["run_id"] == run.info.run_id and saved["tracking"]["restarts"] == 1
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step for m in history} == set(range(5, 41, 5))
    # The restart resumed from the step-20 checkpoint: it logged from step 25 on.
    assert sorted(m.step for m in history if m.timestamp > killed_at) == [25, 30, 35, 40]
