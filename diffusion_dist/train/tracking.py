"""MLflow tracking from rank 0 that never stops or slows training.

The loop hands records (metrics, sample grids, artifacts) to a `Tracker`, which queues them
and returns at once; a daemon thread delivers them in order through MlflowClient. While the
server is down or slow the thread retries with backoff and the queue holds up to
`tracking.max_pending` records; beyond that, new records are dropped with one warning and a
count that the end of the run reports. The run id and a restart count live in every
checkpoint, so a resumed or requeued job continues the same MLflow run.

Credentials reach MLflow through its own environment variables (MLFLOW_TRACKING_USERNAME /
_PASSWORD / _TOKEN) or user:password@ in tracking.uri, which the client uses as given and every
message shows without them; params, tags and the config artifact are the redacted config. launch.train
sets MLflow's HTTP retries to 0 (this thread retries instead) and stops it printing run URLs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, to_dict
from ..data.storage import redact_text

log = logging.getLogger(__name__)

# Failures worth retrying: the server is down, slow, overloaded or restarting.
TRANSIENT_ERRORS = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
RUN_KEY_TAG = "diffusion_dist.run_key"  # finds the run of a job whose checkpoints predate its run id
METRICS_PER_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics
PARAMS_PER_BATCH = 100  # ... and at most 100 params
PARAM_VALUE_CHARS = 6000


def tracking_uri(config: Config) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a local store under run.dir (see local_store)."""
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store(config.run.dir)[0]


def local_store(run_dir: str | Path) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded store: sqlite + files under run.dir/mlflow."""
    root = Path(run_dir).resolve() / "mlflow"
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on a local store."""
    return f"mlflow ui --backend-store-uri {uri}"


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys with string values; URLs in them lose user:password@ and query strings."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            text = redact_text(value) if isinstance(value, str) else str(value)
            out[name] = text[:PARAM_VALUE_CHARS]
    return out


def run_params(config: Config, extra: dict[str, Any]) -> dict[str, str]:
    """The flattened resolved config (credentials redacted) plus `extra` (model size, data, versions)."""
    return flat_params({**to_dict(config), **extra})


def code_version() -> str | None:
    """The git commit of this code ("+dirty" with uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def system_metrics(device: torch.device) -> dict[str, float]:
    """Memory of this process (GPU peak since the last call, or CPU RSS) and the host's CPU and memory load."""
    import psutil

    metrics = {
        "system/cpu_percent": psutil.cpu_percent(),  # since the previous call
        "system/memory_percent": psutil.virtual_memory().percent,
        "memory/process_rss_gb": psutil.Process().memory_info().rss / 2**30,
    }
    if device.type == "cuda":
        metrics["memory/gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        metrics["memory/gpu_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        try:
            metrics["system/gpu_utilization_percent"] = torch.cuda.utilization(device)
        except Exception:  # noqa: BLE001 - needs pynvml and NVML support (not on MIG slices)
            pass
    return metrics


@dataclass
class _Record:
    kind: str  # open | metrics | image | artifacts | finish
    payload: Any


class Tracker:
    """Rank 0's MLflow run, fed through a bounded queue that a daemon thread delivers with retries.

    A disabled tracker (other ranks, tracking.enabled=false) accepts every call and does
    nothing, so the loop never asks which rank it is on before logging.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        *,
        run_id: str | None = None,
        run_key: str | None = None,
        restarts: int = 0,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        config_yaml: str = "",
        artifact_root: str | None = None,
        max_pending: int = 10_000,
        max_retry_delay: float = 30.0,
    ) -> None:
        self.uri, self.run_id, self.run_key, self.restarts = uri, run_id, run_key, restarts
        self.enabled = uri is not None
        self.max_pending, self.max_retry_delay = max_pending, max_retry_delay
        self.dropped = 0  # records refused because the queue was full
        self.failed = 0  # records the server rejected for good
        self._pending: deque[_Record] = deque()
        self._changed = threading.Condition()
        self._closing = threading.Event()  # ends a retry wait early: close() waits for delivery
        self._stopped = False  # the thread gave up (the run could not be opened for good)
        if not self.enabled:
            return
        # Imported here, on the calling thread: importing in the delivery thread while the
        # DataLoader forks its workers could leave a child with an import lock held.
        import mlflow  # noqa: F401

        # Params, tags and the run name are stored on the server: no URL in them keeps its credentials.
        tags = {**(tags or {}), "restarts": str(restarts), **({RUN_KEY_TAG: run_key} if run_key else {})}
        opening = {
            "experiment": experiment,
            "artifact_root": artifact_root,
            "run_name": redact_text(run_name),
            "params": {k: redact_text(v) for k, v in (params or {}).items()},
            "tags": {k: redact_text(v) for k, v in tags.items()},
            "config_yaml": config_yaml,
        }
        self._pending.append(_Record("open", opening))
        threading.Thread(target=self._deliver_forever, name="mlflow-tracking", daemon=True).start()

    @classmethod
    def disabled(cls, run_id: str | None = None, run_key: str | None = None, restarts: int = 0) -> Tracker:
        return cls(None, "", "", run_id=run_id, run_key=run_key, restarts=restarts)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed job continues this run (found by its key while
        the server was unreachable and the run id is not known yet)."""
        return {"run_id": self.run_id, "run_key": self.run_key, "restarts": self.restarts}

    # What the loop calls: each returns at once.

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(_Record("metrics", (step, _now_ms(), metrics)))

    def log_image(self, image: Any, key: str, step: int) -> None:
        self._put(_Record("image", (image, key, step)))

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self._put(_Record("artifacts", (str(directory), artifact_path)))

    def close(self, status: str, timeout: float) -> dict[str, int]:
        """Mark the run FINISHED / KILLED / FAILED and wait up to `timeout` s for delivery.

        Returns the counts of records delivered late or never: {"undelivered", "dropped", "failed"}.
        """
        if not self.enabled:
            return {"undelivered": 0, "dropped": 0, "failed": 0}
        self._put(_Record("finish", status), droppable=False)
        self._closing.set()
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending and not self._stopped and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            undelivered = len(self._pending)
        if undelivered:
            log.warning(
                "tracking: %d records not delivered to %s within %.0f s (tracking.flush_timeout); "
                "they are lost, metrics.jsonl in run.dir has every metric",
                undelivered,
                redact_text(self.uri),
                timeout,
            )
        if self.dropped:
            log.warning("tracking: %d records were dropped while the queue was full", self.dropped)
        return {"undelivered": undelivered, "dropped": self.dropped, "failed": self.failed}

    # The delivery thread.

    def _put(self, record: _Record, droppable: bool = True) -> None:
        if not self.enabled or self._stopped:
            return
        with self._changed:
            if droppable and len(self._pending) >= self.max_pending:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning(
                        "tracking: %d records wait for %s (tracking.max_pending); new ones are dropped "
                        "until it answers (the count is reported at the end)",
                        len(self._pending),
                        redact_text(self.uri),
                    )
                return
            self._pending.append(record)
            self._changed.notify_all()

    def _deliver_forever(self) -> None:
        client, delay, outage_since = None, 0.5, None
        while True:
            with self._changed:
                while not self._pending:
                    self._changed.wait()
                batch = self._head()
            try:
                if client is None:
                    from mlflow import MlflowClient

                    client = MlflowClient(self.uri)
                self._deliver(client, batch)
            except Exception as e:  # noqa: BLE001 - whatever MLflow or the network raises
                if _transient(e):
                    if outage_since is None:
                        outage_since = time.monotonic()
                        log.warning(
                            "tracking: %s unreachable (%s); training goes on, records are queued and retried",
                            redact_text(self.uri),
                            _short(e),
                        )
                    self._closing.wait(delay)
                    delay = min(2 * delay, self.max_retry_delay)
                    continue
                self.failed += len(batch)
                log.warning("tracking: a %s record failed for good and is dropped: %s", batch[0].kind, _short(e))
                if batch[0].kind == "open":  # nothing can be logged without a run
                    with self._changed:
                        self._stopped = True
                        self._pending.clear()
                        self._changed.notify_all()
                    return
            if outage_since is not None:
                log.warning(
                    "tracking: %s answers again after %.0f s", redact_text(self.uri), time.monotonic() - outage_since
                )
                outage_since = None
            delay = 0.5
            with self._changed:
                for _ in batch:
                    self._pending.popleft()
                self._changed.notify_all()

    def _head(self) -> list[_Record]:
        """The first pending record, with the metric records right behind it when it is one."""
        batch = [self._pending[0]]
        if batch[0].kind == "metrics":
            count = len(batch[0].payload[2])
            for record in list(self._pending)[1:]:
                if record.kind != "metrics" or count + len(record.payload[2]) > METRICS_PER_BATCH:
                    break
                batch.append(record)
                count += len(record.payload[2])
        return batch

    def _deliver(self, client: Any, batch: list[_Record]) -> None:
        from mlflow.entities import Metric

        kind, payload = batch[0].kind, batch[0].payload
        if kind == "open":
            self._open(client, **payload)
        elif kind == "metrics":
            metrics = [
                Metric(key, float(value), timestamp, step)
                for step, timestamp, values in (record.payload for record in batch)
                for key, value in values.items()
            ]
            client.log_batch(self.run_id, metrics=metrics)
        elif kind == "image":
            image, key, step = payload
            client.log_image(self.run_id, image, key=key, step=step)
        elif kind == "artifacts":
            client.log_artifacts(self.run_id, *payload)
        elif kind == "finish":
            client.log_batch(self.run_id, tags=_tags({"tracking.dropped_records": str(self.dropped)}))
            client.set_terminated(self.run_id, status=payload)

    def _open(
        self,
        client: Any,
        experiment: str,
        artifact_root: str | None,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        config_yaml: str,
    ) -> None:
        """Create the run, or reopen the checkpoint's run; log params that are new, tag those that changed."""
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=artifact_root)
            except MlflowException as e:  # another job created it just now
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        run = None
        if self.run_id:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "tracking: run %s from the checkpoint is not on this server; starting a new run", self.run_id
                )
        elif self.run_key:  # an earlier start of this job may have opened its run after its last checkpoint
            found = client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1
            )
            run = found[0] if found else None
        if run is None:
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            log.info("tracking: MLflow run %s in experiment %r at %s", self.run_id, experiment, redact_text(self.uri))
        else:
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            log.info("tracking: continuing MLflow run %s (restart %s)", self.run_id, tags["restarts"])
        # The run exists: from here a rejected piece is dropped, tracking goes on.
        logged = run.data.params
        new = [(k, v) for k, v in params.items() if k not in logged]
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:  # MLflow params are write-once: keep what this restart changed as a tag
            tags = {**tags, f"changed_params.restart{tags['restarts']}": json.dumps(changed)[:PARAM_VALUE_CHARS]}
        from mlflow.entities import Param

        pieces = [
            (
                "params",
                lambda chunk=new[i : i + PARAMS_PER_BATCH]: client.log_batch(
                    self.run_id, params=[Param(k, v) for k, v in chunk]
                ),
            )
            for i in range(0, len(new), PARAMS_PER_BATCH)
        ]
        pieces.append(("tags", lambda: client.log_batch(self.run_id, tags=_tags(tags))))
        if config_yaml:
            pieces.append(("config.yaml", lambda: client.log_text(self.run_id, config_yaml, "config.yaml")))
        for what, log_piece in pieces:
            try:
                log_piece()
            except Exception as e:  # noqa: BLE001
                if _transient(e):
                    raise  # retry the whole opening: it finds the run by its id now
                self.failed += 1
                log.warning("tracking: the server rejected the run's %s: %s", what, _short(e))


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _transient(error: Exception) -> bool:
    """A failure of the server or the network (retry), not of the record (drop)."""
    import requests

    code = getattr(error, "error_code", None)
    if code is not None:
        return code in TRANSIENT_ERRORS
    return isinstance(error, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(error: Exception) -> str:
    return redact_text(str(error).splitlines()[0] if str(error) else type(error).__name__)[:300]
