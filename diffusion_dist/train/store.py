"""Checkpoints under any fsspec URL (a local path, file://, s3://bucket/prefix), committed safely on S3.

Layout under the store's URL:

    step-<N>/<attempt>/<name>   the files of one save attempt of step N, each written once
    step-<N>.commit.json        the commit: which attempt of step N counts, each file's size and sha256

On S3 a rename is a copy plus a delete and a PUT overwrites silently, so the local protocol
(write a directory, then an atomic marker inside it) does not carry over. Instead every save
attempt writes under a prefix of its own, so two writers of one step (a requeued job whose old
incarnation still runs) never touch each other's objects, and the commit is created only if
it does not exist (S3 `If-None-Match: *`; locally a hard link, which fails on an existing
name): exactly one attempt per step commits, and the other learns that it lost. There is no
`latest` object to overwrite: readers list the commits. The object store must support
conditional writes (AWS S3 since 2024-08, MinIO, moto 5); one that ignores them would let a
later commit replace an earlier one.

A rank writes its files into `staging_dir` (DeepSpeed needs a local directory), `upload`s
them, and one rank `commit`s the records of all ranks. `fetch` checks every file against
the commit, so a missing, truncated or altered object is found before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from fsspec import AbstractFileSystem

from ..data.storage import filesystem, is_local, join, redact_url, retry

log = logging.getLogger(__name__)
T = TypeVar("T")

_STEP = re.compile(r"step-(\d+)")
_COMMIT = re.compile(r"step-(\d+)\.commit\.json")
_ATTEMPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CHUNK = 8 * 2**20


class CorruptCheckpoint(OSError):
    """A committed checkpoint whose object is missing, truncated or altered: fall back to an older one."""


@dataclass(frozen=True)
class FileRecord:
    """One uploaded file of a save attempt, as the commit lists it."""

    name: str  # relative to the attempt's prefix, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Commit:
    """The contents of `step-<N>.commit.json`."""

    step: int
    attempt: str
    files: dict[str, FileRecord]
    metadata: dict[str, Any]


def new_attempt_id() -> str:
    """An id for one save attempt: made by one rank and shared with the others (time first, for people)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointStore:
    """Save attempts and their commits under `url`; every rank makes its own store for the same URL.

    `retries` and `retry_delay` bound the retries with backoff of every request (storage.retry);
    after them a request raises OSError, so the trainer can skip a save and keep training.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        retries: int = 5,
        retry_delay: float = 0.5,
    ) -> None:
        self.fs, self.root = filesystem(url, storage_options)
        self.local = is_local(self.fs)
        self.retries, self.retry_delay = retries, retry_delay

    def staging_dir(self, step: int, attempt: str, scratch: Path) -> Path:
        """The local directory where a rank writes its files of this attempt before `upload`.

        For a local store it is the attempt's own directory, so `upload` only hashes the files: a
        checkpoint of many gigabytes is not copied a second time on the same disk. Otherwise it is
        `scratch/step-<N>/<attempt>`, which the caller removes after `upload`. It is created here.
        """
        if self.local:
            directory = Path(self._attempt(step, attempt))
        else:
            directory = scratch / f"step-{step}" / _checked_attempt(attempt)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def upload(self, step: int, attempt: str, local_dir: Path, names: Iterable[str]) -> list[FileRecord]:
        """Hash and upload this rank's files `names` from `local_dir` under the attempt's prefix.

        Raises OSError when the store stays unreachable after the retries (nothing is committed). A
        multipart upload killed midway leaves parts that S3 bills but never shows: a bucket lifecycle
        rule (AbortIncompleteMultipartUpload) removes them.
        """
        prefix = self._attempt(step, attempt)
        in_place = self.local and Path(local_dir).resolve() == Path(prefix).resolve()
        records = []
        for name in names:
            source = Path(local_dir) / _checked_name(name)
            records.append(FileRecord(name, source.stat().st_size, sha256_of(source)))
            if in_place:
                continue
            target = join(prefix, name)
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            self._retry(lambda s=source, t=target: self.fs.put_file(str(s), t), f"uploading {self._url(target)}")
        return records

    def commit(
        self, step: int, attempt: str, records: Iterable[FileRecord], metadata: Mapping[str, Any] | None = None
    ) -> bool:
        """Commit the attempt with the records of every rank (called by one rank, after all uploads).

        True if this attempt is now step's checkpoint; False if another attempt committed the step
        first (this one's objects are garbage that `prune` removes). Raises OSError if a record's
        object is missing or has another size, or if the store stays unreachable.
        """
        files: dict[str, FileRecord] = {}
        for record in records:
            if record.name in files:
                raise ValueError(f"{record.name} is listed twice: each rank uploads only its own files")
            files[_checked_name(record.name)] = record
        prefix = self._attempt(step, attempt)
        self._check_uploaded(prefix, files)
        body = {
            "step": step,
            "attempt": attempt,
            "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(files.items())},
            "metadata": dict(metadata or {}),
        }
        data = json.dumps(body, indent=1).encode()
        path = self._commit_path(step)
        if self._retry(lambda: self._create(path, data, prefix), f"committing {self._url(path)}"):
            return True
        # A retried request whose first try did succeed also ends here: the commit is then our own.
        winner = self.read_commit(step).attempt
        if winner == attempt:
            return True
        log.warning("step %d: attempt %s lost the commit to attempt %s", step, attempt, winner)
        return False

    def committed(self) -> list[int]:
        """The steps that have a commit, newest first (one listing of the store's top level)."""
        return sorted(self._top_level()[0], reverse=True)

    def read_commit(self, step: int) -> Commit:
        """Step's commit; FileNotFoundError if it has none, CorruptCheckpoint if it cannot be read."""
        path = self._commit_path(step)
        data = self._retry(lambda: self.fs.cat_file(path), f"reading {self._url(path)}")
        try:
            body = json.loads(data)
            files = {name: FileRecord(name, int(f["size"]), str(f["sha256"])) for name, f in body["files"].items()}
            commit = Commit(int(body["step"]), _checked_attempt(body["attempt"]), files, dict(body["metadata"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpoint(f"{self._url(path)} is not a readable commit ({e!r})") from e
        if commit.step != step:
            raise CorruptCheckpoint(f"{self._url(path)} names step {commit.step}")
        return commit

    def fetch(self, step: int, names: Iterable[str] | None, local_dir: Path) -> Path:
        """Download `names` (None: every file) of step's committed attempt, checked against the commit.

        Returns the directory that holds them: `local_dir`, or for a local store the attempt's own
        directory, checked in place rather than copied. Raises CorruptCheckpoint naming the first
        object that is missing or whose size or sha256 differs from the commit, FileNotFoundError
        for a name the commit does not list.
        """
        commit = self.read_commit(step)
        prefix = self._attempt(step, commit.attempt)
        wanted = list(commit.files) if names is None else list(names)
        for name in wanted:
            if name not in commit.files:
                raise FileNotFoundError(f"the commit of step {step} lists no {name!r}")
        if self.local:
            for name in wanted:
                self._verify(Path(join(prefix, name)), commit.files[name], join(prefix, name))
            return Path(prefix)
        for name in wanted:
            source, target = join(prefix, name), Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                try:
                    download = lambda s=source, t=temporary: self.fs.get_file(s, str(t))
                    self._retry(download, f"downloading {self._url(source)}")
                except FileNotFoundError as e:
                    raise CorruptCheckpoint(f"{self._url(source)} is missing") from e
                self._verify(temporary, commit.files[name], source)
                os.replace(temporary, target)
            finally:
                temporary.unlink(missing_ok=True)
        return Path(local_dir)

    def prune(self, keep: int, protect: Collection[int] = ()) -> list[str]:
        """Keep the newest `keep` commits (at least one); delete older steps and uncommitted attempts.

        Deleted: the commits and prefixes of older committed steps, the attempts that lost a kept
        step's commit, and steps without a commit that are older than the newest commit (killed
        saves), except the `protect`ed steps (checkpoints of another format the caller manages).
        Nothing newer than the newest commit is touched: a save may be in flight. Returns the
        deleted names, relative to the store.
        """
        commits, prefixes = self._top_level()
        if not commits:
            return []
        newest = sorted(commits, reverse=True)
        kept, dropped = newest[: max(1, keep)], newest[max(1, keep) :]
        deleted = []
        for step in dropped:
            # The commit goes first: a step never counts as committed while its files are vanishing.
            deleted += self._delete(self._commit_path(step), recursive=False)
            deleted += self._delete(self._step(step), recursive=True)
        for step in prefixes - set(commits) - set(protect):
            if step < newest[0]:
                deleted += self._delete(self._step(step), recursive=True)
        for step in kept:
            try:
                winner = self._attempt(step, self.read_commit(step).attempt)
            except (CorruptCheckpoint, FileNotFoundError) as e:  # its attempts go when the step ages out
                log.warning("not pruning the attempts of step %d: %s", step, e)
                continue
            for attempt in self._list(self._step(step)):
                if attempt.rstrip("/") != winner:
                    deleted += self._delete(attempt, recursive=True)
        return deleted

    def _create(self, path: str, data: bytes, scratch_dir: str) -> bool:
        """Write `data` at `path` only if nothing is there (False if something is), never partially."""
        if not self.local:
            try:
                self.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
                return False
            return True
        # A hard link publishes the complete file under a name that must not exist yet (link(2)
        # fails with EEXIST); O_EXCL alone would let a reader see the file half written.
        os.makedirs(scratch_dir, exist_ok=True)
        temporary = join(scratch_dir, f".commit.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(temporary, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        finally:
            Path(temporary).unlink(missing_ok=True)

    def _check_uploaded(self, prefix: str, files: dict[str, FileRecord]) -> None:
        """Every record's object is under `prefix` with its size: one listing, no request per file."""
        listed = self._retry(lambda: self._fresh().find(prefix, detail=True), f"listing {self._url(prefix)}")
        sizes = {path[len(prefix) + 1 :]: info["size"] for path, info in listed.items()}
        for name, record in files.items():
            if sizes.get(name) != record.size:
                found = "missing" if name not in sizes else f"{sizes[name]} bytes, not {record.size}"
                raise OSError(f"not committing {self._url(join(prefix, name))}: {found}")

    def _verify(self, local: Path, record: FileRecord, source: str) -> None:
        if not local.is_file():
            raise CorruptCheckpoint(f"{self._url(source)} is missing")
        size = local.stat().st_size
        if size != record.size:
            raise CorruptCheckpoint(f"{self._url(source)} has {size} bytes, the commit says {record.size}")
        if sha256_of(local) != record.sha256:
            raise CorruptCheckpoint(f"{self._url(source)} has another sha256 than the commit's")

    def _top_level(self) -> tuple[set[int], set[int]]:
        """The steps with a commit and the steps with a prefix, from one listing of the root."""
        commits, prefixes = set(), set()
        for path in self._list(self.root):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if match := _COMMIT.fullmatch(name):
                commits.add(int(match[1]))
            elif match := _STEP.fullmatch(name):
                prefixes.add(int(match[1]))
        return commits, prefixes

    def _list(self, path: str) -> list[str]:
        """The entries directly under `path` (none if it does not exist), listed afresh."""
        try:
            return self._retry(lambda: self._fresh().ls(path, detail=False), f"listing {self._url(path)}")
        except FileNotFoundError:
            return []

    def _fresh(self) -> AbstractFileSystem:
        # Other processes write here: s3fs's listings cache would hide their commits.
        self.fs.invalidate_cache()
        return self.fs

    def _delete(self, path: str, recursive: bool) -> list[str]:
        try:
            self._retry(lambda: self.fs.rm(path, recursive=recursive), f"deleting {self._url(path)}")
        except FileNotFoundError:  # already gone: another job's prune got there first
            return []
        return [path[len(self.root) + 1 :]]

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, what, attempts=self.retries, base_delay=self.retry_delay)

    def _step(self, step: int) -> str:
        return join(self.root, f"step-{step}")

    def _attempt(self, step: int, attempt: str) -> str:
        return join(self._step(step), _checked_attempt(attempt))

    def _commit_path(self, step: int) -> str:
        return join(self.root, f"step-{step}.commit.json")

    def _url(self, path: str) -> str:
        return redact_url(self.fs.unstrip_protocol(path))


def _checked_attempt(attempt: str) -> str:
    if not _ATTEMPT.fullmatch(attempt):
        raise ValueError(f"attempt id {attempt!r} must be letters, digits, '.', '_' or '-'")
    return attempt


def _checked_name(name: str) -> str:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or "\\" in name or any(p in (".", "..") for p in parts):
        raise ValueError(f"file name {name!r} must be a relative '/'-separated path inside the attempt")
    return name
