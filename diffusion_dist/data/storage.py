"""Object storage through fsspec: URLs, retries with backoff, atomic writes, safe messages."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that retrying cannot fix: fail at once with the path in the message.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """OSError plus the network errors s3fs lets through unchanged once its own retries are spent."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (
        ("botocore.exceptions", "BotoCoreError"),
        ("aiohttp", "ClientError"),
        ("urllib3.exceptions", "HTTPError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (bucket/key for s3://, absolute for local)."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(root: str, *parts: str) -> str:
    """`root/part/...` with single slashes, for local and object-store paths alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


# user:password@ may itself hold '/' or '@' (AWS secrets do): strip through the last '@' of the URL.
_USERINFO_IN_TEXT = re.compile(r"([a-z][a-z0-9+.-]*://)\S*@", re.I)


def redact_url(url: str) -> str:
    """The URL without user:password@ and without a query string (signatures, tokens)."""
    try:
        parts = urlsplit(_USERINFO_IN_TEXT.sub(r"\1", url))
    except ValueError:
        return "<unparseable url>"
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


# Any scheme: s3://b/k?token=..., sqlite:///x?password=..., https://h/cb#access_token=... (OAuth fragments).
_QUERY_IN_TEXT = re.compile(r"([a-z][a-z0-9+.-]*://[^\s?#'\"]*)([?#])[^\s'\"]*", re.I)


def redact_text(text: str) -> str:
    """Text (a message, a config value) with user:password@, query strings (presigned signatures, tokens)
    and fragments removed from every URL in it."""
    return _QUERY_IN_TEXT.sub(r"\1\2<redacted>", _USERINFO_IN_TEXT.sub(r"\1", text))


class StorageUnavailable(OSError):
    """Transient errors went on through every retry: the storage is down or unreachable from here."""


def retry(
    fn: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
) -> T:
    """Call fn, retrying transient OSErrors with exponential backoff; the last error names `what`."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT_ERRORS:
            raise
        except TRANSIENT_ERRORS as e:
            if getattr(e, "status", None) in (401, 403, 404):  # HTTP: a wrong credential or URL stays wrong
                raise
            if attempt == attempts:
                raise StorageUnavailable(f"{what}: failed after {attempts} attempts: {redact_text(str(e))}") from e
            delay = min(base_delay * 2 ** (attempt - 1), max_delay)
            log.warning("%s: %s; retrying in %.1f s (%d/%d)", what, redact_text(str(e)), delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary local path to write; on success it replaces `path` in one rename, so readers see the
    old file or the new one, never a partial one. On an error the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: writers finishing at the same moment must not share a temporary.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that `path` never holds a partial file.

    Local files are written under a temporary name and renamed. Object stores publish an
    object only when its PUT (or multipart upload) completes, so they are written directly.
    """

    def attempt() -> None:
        if is_local(fs):
            with atomic_file(path) as temporary:
                fs.pipe_file(str(temporary), data)
        else:
            fs.pipe_file(path, data)

    retry(attempt, what=f"writing {redact_url(fs.unstrip_protocol(path))}")


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    """The whole object at `path`, with retries."""
    return retry(lambda: fs.cat_file(path), what=f"reading {redact_url(fs.unstrip_protocol(path))}")
