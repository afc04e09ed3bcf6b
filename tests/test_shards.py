"""The fast tar parser and npy reader against webdataset's reader and against damaged input."""

import io
import tarfile

import numpy as np
import pytest

from diffusion_dist.data.shards import CorruptShard, NpyReader, encode_npy, iter_tar_samples, parse_tar, tar_bytes
from diffusion_dist.data.storage import redact_text, redact_url


def tar_of(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT, directories=()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name in directories:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def as_bytes(samples):
    return [{k: v if k == "__key__" else bytes(v) for k, v in s.items()} for s in samples]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_parse_tar_groups_like_webdataset(fmt):
    long_dir = "d" * 60 + "/" + "e" * 60  # beyond the 100-byte name field: ustar prefix, GNU L or pax
    members = [
        ("a.b/k1.latent.npy", b"1"),
        ("a.b/k1.CLS", b"3"),
        (f"{long_dir}/k2.json", b"{}"),
        (f"{long_dir}/k2.latent.npy", b"2"),
        ("k3.txt", b"x"),
    ]
    data = tar_of(members, fmt, directories=[long_dir] if fmt != tarfile.USTAR_FORMAT else [])
    assert as_bytes(parse_tar(data)) == list(iter_tar_samples(data))
    assert parse_tar(data)[0]["cls"] == b"3"  # extensions lower-cased, as webdataset does


def test_parse_tar_agrees_with_the_writer():
    samples = [
        {"__key__": f"s/{i}", "latent.npy": encode_npy(np.full((2, 2), i, np.float16)), "cls": b"1"} for i in range(5)
    ]
    assert as_bytes(parse_tar(tar_bytes(samples))) == samples


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:1000],  # truncated inside the first member
        lambda d: d[:124] + b"-0000001001" + d[135:],  # negative size: must not loop forever
        lambda d: d[:124] + b"zzzzzzzzzzz" + d[135:],  # not octal
        lambda d: bytes(np.random.default_rng(0).integers(1, 256, len(d), dtype=np.uint8)),
        lambda d: d[:1536] + b"x" * 100,  # stray bytes where a header should start
    ],
)
def test_damaged_tars_raise_corrupt_shard(damage):
    data = tar_of([("k.latent.npy", b"1" * 700), ("k.cls", b"2")])
    with pytest.raises(CorruptShard):
        parse_tar(damage(data))


def test_duplicate_members_are_corrupt():
    with pytest.raises(CorruptShard, match="two 'cls' members"):
        parse_tar(tar_of([("k.cls", b"1"), ("k.cls", b"2")]))


def test_npy_reader_fast_path_and_fallbacks():
    reader = NpyReader()
    arrays = [np.arange(12, dtype=np.float16).reshape(3, 4) + i for i in range(4)]
    members = [memoryview(encode_npy(a)) for a in arrays]
    assert np.array_equal(reader.stack(members), np.stack(arrays))
    fortran = np.asfortranarray(np.arange(12, dtype=np.float16).reshape(3, 4))
    assert np.array_equal(NpyReader().stack([memoryview(encode_npy(fortran))] * 2), np.stack([fortran] * 2))
    big_endian = np.arange(6, dtype=">f2").reshape(2, 3)
    assert np.array_equal(NpyReader()(memoryview(encode_npy(big_endian))), big_endian.astype("<f2"))
    with pytest.raises(CorruptShard):
        reader(memoryview(encode_npy(arrays[0])[:-2]))


def test_secrets_with_slashes_and_at_signs_are_redacted():
    assert redact_url("s3://AKIAXYZ:wJalr/XUtnFEMI@bucket/data") == "s3://bucket/data"
    cleaned = redact_text("failed: https://user:p@ss@host/y (retry)")
    assert "p@ss" not in cleaned and "ss@" not in cleaned and "https://host/y" in cleaned
