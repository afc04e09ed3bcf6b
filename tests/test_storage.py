"""Storage helpers: retries with backoff, atomic writes, URLs and messages without credentials."""

import pytest
from fsspec.implementations.local import LocalFileSystem

from diffusion_dist.data import storage
from diffusion_dist.data.storage import redact_text, redact_url, retry, write_atomic


def test_redact_url_removes_userinfo_and_query():
    assert redact_url("https://user:pa55@host:9000/bucket/key.tar?X-Amz-Signature=abc") == (
        "https://host:9000/bucket/key.tar?<redacted>"
    )
    assert redact_url("s3://bucket/prefix/000001.tar") == "s3://bucket/prefix/000001.tar"


def test_redact_text_cleans_urls_inside_messages():
    message = (
        "Cannot connect to https://admin:hunter2@10.0.0.1/x and "
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA123&X-Amz-Signature=deadbeef failed"
    )
    cleaned = redact_text(message)
    assert "hunter2" not in cleaned and "AKIA123" not in cleaned and "deadbeef" not in cleaned
    assert "https://10.0.0.1/x" in cleaned and "https://b.s3.amazonaws.com/k?<redacted>" in cleaned


def test_redact_text_cleans_urls_of_every_scheme():
    """Not only http(s): s3 and database URLs carry tokens in queries, OAuth callbacks in fragments."""
    cases = {
        "s3://bucket/x?token=t0k3n": "s3://bucket/x?<redacted>",
        "s3://AKIA:se/cr@t@bucket/x": "s3://bucket/x",
        "postgresql://mlflow:pw@db:5432/mlflow?sslpassword=pw": "postgresql://db:5432/mlflow?<redacted>",
        "https://host/callback#access_token=t0k3n": "https://host/callback#<redacted>",
        "file:///data/latents": "file:///data/latents",
        "runs/demo": "runs/demo",
    }
    for text, cleaned in cases.items():
        assert redact_text(text) == cleaned, text


def test_retry_recovers_from_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry(flaky, what="reading x", base_delay=0) == "ok" and len(calls) == 3


def test_retry_gives_up_naming_what_failed():
    def broken():
        raise TimeoutError("timed out")

    with pytest.raises(OSError, match=r"writing s3://b/000007-000.tar: failed after 4 attempts: timed out"):
        retry(broken, what="writing s3://b/000007-000.tar", attempts=4, base_delay=0)


def test_retry_does_not_retry_permanent_errors():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        retry(missing, what="reading", base_delay=0)
    assert len(calls) == 1


class FlakyLocal(LocalFileSystem):
    """A local filesystem whose writes fail a given number of times."""

    def __init__(self, failures: int):
        super().__init__(skip_instance_cache=True)
        self.failures = failures

    def pipe_file(self, path, value, **kwargs):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection dropped mid-write")
        return super().pipe_file(path, value, **kwargs)


def test_write_atomic_retries_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    target = str(tmp_path / "shard.tar")
    write_atomic(FlakyLocal(failures=2), target, b"x" * 1000)
    assert (tmp_path / "shard.tar").read_bytes() == b"x" * 1000

    with pytest.raises(OSError, match="shard2.tar: failed after 5 attempts"):
        write_atomic(FlakyLocal(failures=10), str(tmp_path / "shard2.tar"), b"y")
    assert not (tmp_path / "shard2.tar").exists()
