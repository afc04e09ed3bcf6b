"""CheckpointStore on a local directory and on S3 (a moto server on loopback): commits, races, damage, outages."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from diffusion_dist.train.store import CheckpointStore, CorruptCheckpoint, FileRecord, new_attempt_id
from tests.conftest import CANARY_KEY_ID, CANARY_SECRET, ROOT, free_port

# Two "ranks" of a ZeRO job: rank 0 also writes the shared state and the module weights.
RANK_FILES = [
    {"mp_rank_00_model_states.pt": 300_000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 200_000, "shared.pt": 5_000},
    {"zero_pp_rank_1_mp_rank_00_optim_states.pt": 200_000, "rank-00001.pt": 3_000},
]


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> tuple[str, dict]:
    """A checkpoint.dir: a local path, or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "run" / "checkpoints"), {}
    s3 = request.getfixturevalue("s3")
    return s3.url("run", "checkpoints"), s3.storage_options


def make_store(location: tuple[str, dict]) -> CheckpointStore:
    url, options = location
    return CheckpointStore(url, options, retries=2, retry_delay=0.01)


def rank_bytes(step: int, attempt: str, rank: int) -> dict[str, bytes]:
    """Distinct contents per step, attempt and rank, so a mix-up shows."""
    seed = f"{step}/{attempt}/{rank}".encode()
    return {
        name: (hashlib.sha256(seed + name.encode()).digest() * (size // 32 + 1))[:size]
        for name, size in RANK_FILES[rank].items()
    }


def save(location: tuple[str, dict], step: int, scratch: Path, attempt: str | None = None) -> tuple[str, bool]:
    """A whole save as the trainer makes it: every rank stages and uploads its files, then rank 0 commits."""
    attempt = attempt or new_attempt_id()
    records: list[FileRecord] = []
    for rank in range(len(RANK_FILES)):
        store = make_store(location)  # each rank has its own
        staging = store.staging_dir(step, attempt, scratch / f"rank-{rank}")
        for name, data in rank_bytes(step, attempt, rank).items():
            (staging / name).write_bytes(data)
        records += store.upload(step, attempt, staging, list(RANK_FILES[rank]))
    return attempt, make_store(location).commit(step, attempt, records, {"world_size": len(RANK_FILES)})


def expected(step: int, attempt: str) -> dict[str, bytes]:
    return {name: data for rank in range(len(RANK_FILES)) for name, data in rank_bytes(step, attempt, rank).items()}


def assert_fetches(store: CheckpointStore, step: int, attempt: str, into: Path) -> None:
    directory = store.fetch(step, None, into)
    for name, data in expected(step, attempt).items():
        assert (directory / name).read_bytes() == data, name


def raw(location: tuple[str, dict]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The store's filesystem without the store, to look at and damage its objects."""
    url, options = location
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def test_round_trip(location, tmp_path):
    attempt, won = save(location, 10, tmp_path / "scratch")
    assert won
    store = make_store(location)
    assert store.committed() == [10]

    commit = store.read_commit(10)
    assert (commit.step, commit.attempt, commit.metadata) == (10, attempt, {"world_size": 2})
    # The commit lists every rank's file with the size and sha256 of what the ranks wrote.
    assert {name: (r.size, r.sha256) for name, r in commit.files.items()} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in expected(10, attempt).items()
    }
    assert_fetches(store, 10, attempt, tmp_path / "fetched")
    one = store.fetch(10, ["rank-00001.pt"], tmp_path / "one")
    assert (one / "rank-00001.pt").read_bytes() == expected(10, attempt)["rank-00001.pt"]
    with pytest.raises(FileNotFoundError, match="rank-00002.pt"):
        store.fetch(10, ["rank-00002.pt"], tmp_path / "two")

    fs, root = raw(location)
    if location[1]:
        assert one == tmp_path / "one"  # downloaded
    else:  # a local store's staging directory is the attempt itself: nothing was copied
        assert one == Path(root) / "step-10" / attempt
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["step-10", "step-10.commit.json"]


# Uploads this rank's files (a small one, then a large one) of a save that a SIGKILL interrupts.
UPLOADER = """
import json, sys
from pathlib import Path
from diffusion_dist.train.store import CheckpointStore
url, options, staging = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
store = CheckpointStore(url, options)
store.upload(2, "killed", staging, ["small.pt"])
print("uploading large.pt", flush=True)
store.upload(2, "killed", staging, ["large.pt"])
print("done", flush=True)
sys.stdin.read()
"""


def test_killed_upload_is_never_committed(location, tmp_path):
    attempt, _ = save(location, 1, tmp_path / "scratch")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "small.pt").write_bytes(b"s" * 1000)
    (staging / "large.pt").write_bytes(os.urandom(24 * 2**20))
    child = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, location[0], json.dumps(location[1]), str(staging)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "uploading large.pt\n"
    finally:
        child.send_signal(signal.SIGKILL)  # while it hashes or uploads large.pt
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    store = make_store(location)
    assert store.committed() == [1]
    assert_fetches(store, 1, attempt, tmp_path / "fetched")
    fs, root = raw(location)
    assert fs.exists(f"{root}/step-2/killed/small.pt")
    # Newer than the newest commit: it might be a save in flight, so pruning leaves it.
    store.prune(keep=3)
    assert fs.exists(f"{root}/step-2/killed/small.pt")
    # Once a newer step commits, the killed save is an old leftover and goes.
    save(location, 3, tmp_path / "scratch")
    assert "step-2" in store.prune(keep=3)
    assert not raw(location)[0].exists(f"{root}/step-2")
    assert store.committed() == [3, 1]


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_damaged_part_raises_corrupt_checkpoint(location, tmp_path, damage):
    older, _ = save(location, 1, tmp_path / "scratch")
    newer, _ = save(location, 2, tmp_path / "scratch")
    fs, root = raw(location)
    path = f"{root}/step-2/{newer}/rank-00001.pt"
    data = fs.cat_file(path)
    if damage == "missing":
        fs.rm_file(path)
    elif damage == "truncated":
        fs.pipe_file(path, data[: len(data) // 2])
    else:  # same size, one byte changed: only the hash tells
        fs.pipe_file(path, data[:100] + bytes([data[100] ^ 1]) + data[101:])

    store = make_store(location)
    assert store.committed() == [2, 1]  # a listing does not look inside the checkpoints
    message = {
        "missing": "is missing",
        "truncated": "has 1500 bytes, the commit says 3000",
        "altered": "has another sha256",
    }[damage]
    with pytest.raises(CorruptCheckpoint, match=f"step-2/{newer}/rank-00001.pt {message}"):
        store.fetch(2, None, tmp_path / "fetched-2")
    assert_fetches(store, 1, older, tmp_path / "fetched-1")  # the caller falls back to the previous commit


def test_unreadable_commit_raises_corrupt_checkpoint(location, tmp_path):
    save(location, 4, tmp_path / "scratch")
    fs, root = raw(location)
    fs.pipe_file(f"{root}/step-4.commit.json", b'{"step": 4, "files"')
    with pytest.raises(CorruptCheckpoint, match="step-4.commit.json is not a readable commit"):
        make_store(location).fetch(4, None, tmp_path / "fetched")


def test_racing_writers_one_commit_wins(location, tmp_path):
    """Two incarnations of a job save the same steps at the same moment (threads released together)."""
    for step in (1, 2, 3):
        start = threading.Barrier(2)
        results: dict[str, bool] = {}

        def writer(attempt: str, step: int = step, start: threading.Barrier = start, results: dict = results) -> None:
            start.wait()
            results[attempt] = save(location, step, tmp_path / attempt, attempt)[1]

        threads = [threading.Thread(target=writer, args=(f"{who}-{step}",)) for who in ("old", "new")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(results.values()) == [False, True], results
        winner = next(attempt for attempt, won in results.items() if won)
        store = make_store(location)
        assert store.read_commit(step).attempt == winner
        assert_fetches(store, step, winner, tmp_path / f"fetched-{step}")
    assert make_store(location).committed() == [3, 2, 1]


def test_late_writer_loses_and_winner_retry_wins(location, tmp_path):
    winner, won = save(location, 7, tmp_path / "scratch")
    loser, lost = save(location, 7, tmp_path / "scratch")
    assert (won, lost) == (True, False)
    store = make_store(location)
    # The winner's commit request retried after a lost response: the commit there is its own.
    assert store.commit(7, winner, store.read_commit(7).files.values(), {"world_size": 2})
    assert store.read_commit(7).attempt == winner
    assert_fetches(store, 7, winner, tmp_path / "fetched")


def test_commit_refuses_files_that_were_not_uploaded(location, tmp_path):
    attempt, _ = save(location, 1, tmp_path / "scratch")
    store = make_store(location)
    records = list(store.read_commit(1).files.values())
    with pytest.raises(OSError, match=r"not committing \S*/step-5/other/\S+\.pt: missing"):
        store.commit(5, "other", records)
    fs, root = raw(location)
    fs.makedirs(f"{root}/step-6/short", exist_ok=True)
    fs.pipe_file(f"{root}/step-6/short/shared.pt", b"x")
    with pytest.raises(OSError, match="step-6/short/shared.pt: 1 bytes, not 5000"):
        store.commit(6, "short", [r for r in records if r.name == "shared.pt"])
    with pytest.raises(ValueError, match="listed twice"):
        store.commit(1, attempt, records + records[:1])
    assert store.committed() == [1]


class Endpoint:
    """A TCP proxy in front of the moto server that can fail like a crashed S3 endpoint: once `budget`
    bytes were sent upstream it closes every connection and refuses new ones, until `up()`."""

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.budget: int | None = None
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.serving = threading.Event()
        self.up()

    def up(self) -> None:
        self.budget = None
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.05)
        self.serving.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        self.serving.clear()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self.serving.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                server = socket.create_connection(self.target)
                with self.lock:
                    self.sockets |= {client, server}
                threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if upstream and self.budget is not None:
                    self.budget -= len(chunk)
                    if self.budget < 0:
                        self.down()
                        return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            sink.close()


def test_s3_down_during_upload(s3, s3_server, tmp_path):
    endpoint = Endpoint(s3_server)
    # botocore retries too: one try, so that the store's budget (and s3fs's few retries) bound the outage.
    options = {
        "key": CANARY_KEY_ID,
        "secret": CANARY_SECRET,
        "client_kwargs": {"endpoint_url": endpoint.url},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 2},
    }
    location = (s3.url("run", "checkpoints"), options)
    first, _ = save(location, 1, tmp_path / "scratch")

    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a.pt").write_bytes(b"a" * 10_000)
    (staging / "b.pt").write_bytes(os.urandom(2 * 2**20))
    endpoint.budget = 2**20  # a.pt goes through; the endpoint dies halfway through b.pt
    store = make_store(location)
    began = time.monotonic()
    with pytest.raises(OSError, match=r"uploading s3://.*/step-2/cut/b.pt: failed after 2 attempts") as failure:
        store.upload(2, "cut", staging, ["a.pt", "b.pt"])
    assert time.monotonic() - began < 30
    assert endpoint.budget < 0 and not endpoint.serving.is_set()
    assert CANARY_SECRET not in str(failure.value) and CANARY_KEY_ID not in str(failure.value)
    with pytest.raises(OSError, match="failed after 2 attempts"):
        store.committed()  # still down

    endpoint.up()
    assert store.committed() == [1]  # nothing of the cut save was committed
    fs, root = raw((s3.url("run", "checkpoints"), s3.storage_options))
    assert fs.exists(f"{root}/step-2/cut/a.pt") and not fs.exists(f"{root}/step-2/cut/b.pt")
    second, won = save(location, 2, tmp_path / "scratch")
    assert won and store.committed() == [2, 1]
    assert_fetches(store, 2, second, tmp_path / "fetched")
    assert "step-2/cut" in store.prune(keep=2)  # the cut attempt lost step 2 to the retry
    endpoint.down()


def test_prune(location, tmp_path):
    scratch = tmp_path / "scratch"
    first, _ = save(location, 1, scratch)
    save(location, 1, scratch, "lost-1")
    save(location, 3, scratch)
    killed = make_store(location)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.pt").write_bytes(b"x")
    killed.upload(2, "killed-2", tmp_path / "s", ["x.pt"])
    fourth, _ = save(location, 4, scratch)
    save(location, 4, scratch, "lost-4")
    killed.upload(5, "in-flight-5", tmp_path / "s", ["x.pt"])  # newer than the newest commit

    store = make_store(location)
    deleted = store.prune(keep=2)
    assert sorted(deleted) == ["step-1", "step-1.commit.json", "step-2", "step-4/lost-4"]

    fs, root = raw(location)
    top = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert top == ["step-3", "step-3.commit.json", "step-4", "step-4.commit.json", "step-5"]
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/step-4", detail=False)] == [fourth]
    assert fs.exists(f"{root}/step-5/in-flight-5/x.pt")
    assert store.committed() == [4, 3]
    assert_fetches(store, 4, fourth, tmp_path / "fetched")

    # keep=0 still keeps the newest commit.
    assert sorted(store.prune(keep=0)) == ["step-3", "step-3.commit.json"]
    assert store.committed() == [4]
    assert fs.exists(f"{root}/step-5/in-flight-5/x.pt")
