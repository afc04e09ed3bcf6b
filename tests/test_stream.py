"""The streaming latent dataset: splitting, order, per-sample draws, exact resume, object storage."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from data_tools import encode_latents
from data_tools.make_digits import write_digits
from diffusion_dist.data import stream as stream_module
from diffusion_dist.data.manifest import DatasetError
from diffusion_dist.data.stream import LatentLoader, batches_per_slot, epoch_plan
from tests.conftest import ROOT
from tests.latent_data import write_dataset

UNEVEN = [37, 5, 61, 12, 29, 3, 44, 18, 50, 7, 23, 31, 2, 40]  # 362 samples in 14 shards


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging."""

    def expire(*_):
        raise TimeoutError(f"no progress within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def loader(url, rank=0, world_size=1, num_workers=0, batch_size=4, **kwargs) -> LatentLoader:
    return LatentLoader(
        str(url),
        batch_size=batch_size,
        null_label=5,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=kwargs.pop("seed", 7),
        shuffle_shards=kwargs.pop("shuffle_shards", 2),
        **kwargs,
    )


def keys_by_epoch(source: LatentLoader, epochs: int) -> dict[int, list[list[str]]]:
    """Batches of keys per epoch, for the first `epochs` epochs."""
    out: dict[int, list[list[str]]] = {}
    with deadline(120):
        for batch in source:
            if batch.epoch >= epochs:
                break
            out.setdefault(batch.epoch, []).append(batch.keys)
    return out


def take(source: LatentLoader, n: int) -> list[list[str]]:
    with deadline(120):
        return [b.keys for b in itertools.islice(source, n)]


def test_epoch_plan_deals_every_shard_once_and_balances_slots():
    sizes = tuple(UNEVEN)
    for epoch in range(3):
        plan = epoch_plan(sizes, 4, seed=7, epoch=epoch)
        assert sorted(s for slot in plan for s in slot) == list(range(len(sizes)))
        totals = [sum(sizes[s] for s in slot) for slot in plan]
        assert max(totals) - min(totals) <= max(sizes)
        assert epoch_plan(sizes, 4, seed=7, epoch=epoch) == plan  # a pure function
    assert epoch_plan(sizes, 4, 7, 0) != epoch_plan(sizes, 4, 7, 1)
    assert batches_per_slot(epoch_plan(sizes, 4, 7, 0), sizes, 4) >= (sum(sizes) - 4 * max(sizes)) // 16


def test_two_ranks_two_workers_over_uneven_shards(tmp_path):
    write_dataset(str(tmp_path), UNEVEN)
    ranks = [loader(tmp_path, rank=r, world_size=2, num_workers=2) for r in range(2)]
    epochs = [keys_by_epoch(r, epochs=2) for r in ranks]
    for epoch in range(2):
        counts = [len(e[epoch]) for e in epochs]
        assert counts[0] == counts[1] == ranks[0].batches_per_epoch(epoch) > 0
        keys = [k for e in epochs for batch in e[epoch] for k in batch]
        assert len(keys) == len(set(keys)), "a sample was read twice in one epoch"
        # Documented remainder: each of the 4 slots leaves out < largest shard + batch size.
        assert len(keys) > sum(UNEVEN) - 4 * (max(UNEVEN) + 4)
    assert epochs[0][0] != epochs[0][1]  # reshuffled per epoch
    rank0 = [k for batch in epochs[0][0] for k in batch]
    assert len({k.split("/")[0] for k in rank0[:16]}) > 2, "a worker's batches should mix several shards"


def test_order_is_a_pure_function_of_seed_and_layout(tmp_path):
    write_dataset(str(tmp_path), UNEVEN)
    first = take(loader(tmp_path, num_workers=2), 12)
    assert take(loader(tmp_path, num_workers=2), 12) == first
    assert take(loader(tmp_path, num_workers=2, seed=8), 12) != first


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stops", [[7], [3, 9], ["boundary-1"], ["boundary+3"]])
def test_resume_continues_the_exact_key_sequence(tmp_path, num_workers, stops):
    write_dataset(str(tmp_path), UNEVEN)
    per_epoch = loader(tmp_path, rank=1, world_size=2, num_workers=num_workers).batches_per_epoch(0)
    stops = [per_epoch + int(s.removeprefix("boundary")) if isinstance(s, str) else s for s in stops]
    total = max(stops) + per_epoch  # runs well into the next epoch
    expected = take(loader(tmp_path, rank=1, world_size=2, num_workers=num_workers), total)

    got, state, consumed = [], None, 0
    for stop in [*stops, total]:
        current = loader(tmp_path, rank=1, world_size=2, num_workers=num_workers)
        if state is not None:
            current.load_state_dict(json.loads(json.dumps(state)))  # the state survives serialisation
        got += take(current, stop - consumed)
        consumed, state = stop, current.state_dict()
    assert got == expected


def test_resume_reads_no_consumed_group_again(tmp_path, monkeypatch):
    write_dataset(str(tmp_path), UNEVEN)
    first = loader(tmp_path, batch_size=4, shuffle_shards=2)
    take(first, 40)  # 160 samples: well past the first groups of shards
    state = first.state_dict()
    position = state["positions"][0]
    assert position["group"] >= 2

    reads = []
    original = stream_module.read_bytes
    monkeypatch.setattr(stream_module, "read_bytes", lambda fs, path: reads.append(path) or original(fs, path))
    resumed = loader(tmp_path, batch_size=4, shuffle_shards=2)
    resumed.load_state_dict(state)
    take(resumed, 1)
    shards = epoch_plan(tuple(UNEVEN), 1, 7, position["epoch"])[0]
    consumed_groups = {f"{s:06d}-000.tar" for s in shards[: 2 * position["group"]]}
    assert reads and not {p.rsplit("/", 1)[-1] for p in reads} & consumed_groups


def test_layout_change_restarts_at_the_next_epoch(tmp_path, caplog):
    write_dataset(str(tmp_path), UNEVEN)
    first = loader(tmp_path, num_workers=0)
    take(first, 5)
    other = loader(tmp_path, num_workers=2)
    other.load_state_dict(first.state_dict())
    assert "exact resume is impossible" in caplog.text
    assert other.epoch == 1


def test_latents_are_drawn_from_the_moments_and_scaled(tmp_path):
    # mean 1, std 0.5; flips mean −1; latent = (z − 0.2) · 0.5
    write_dataset(str(tmp_path), [200, 200], shape=(4, 8, 8))
    batch = next(iter(loader(tmp_path, batch_size=256)))
    assert batch.latents.shape == (256, 4, 8, 8) and batch.latents.dtype == torch.float32
    z = batch.latents / 0.5 + 0.2
    flipped = z.mean(dim=(1, 2, 3)) < 0
    assert 0.4 < flipped.float().mean() < 0.6  # flipped or unflipped at random
    assert z[~flipped].mean().item() == pytest.approx(1.0, abs=0.01)
    assert z[~flipped].std().item() == pytest.approx(0.5, rel=0.02)
    assert z[flipped].mean().item() == pytest.approx(-1.0, abs=0.01)
    # A fresh draw each epoch and each seed: the same sample never gets a frozen latent.
    again = next(iter(loader(tmp_path, batch_size=256)))
    assert torch.equal(again.latents, batch.latents)
    assert not torch.equal(next(iter(loader(tmp_path, batch_size=256, seed=8))).latents, batch.latents)


def test_labels_and_the_null_label(tmp_path):
    write_dataset(str(tmp_path / "labelled"), [20, 20])
    batch = next(iter(loader(tmp_path / "labelled", batch_size=8)))
    assert batch.labels.tolist() == [(int(k[1:4]) + int(k[5:])) % 5 for k in batch.keys]
    write_dataset(str(tmp_path / "unlabelled"), [20, 20], labelled=False, moments=False, flip=False)
    batch = next(iter(loader(tmp_path / "unlabelled", batch_size=8)))
    assert (batch.labels == 5).all()


def test_bad_datasets_are_clear_errors_before_training(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json; encode a dataset there"):
        loader(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        loader(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DatasetError, match="field 'format' is missing|not a diffusion-dist-latents manifest"):
        loader(tmp_path / "bad")
    write_dataset(str(tmp_path / "empty"), [])
    with pytest.raises(DatasetError, match="has no samples"):
        loader(tmp_path / "empty")
    write_dataset(str(tmp_path / "small"), [3, 3])
    with pytest.raises(DatasetError, match="cannot give each of 4 readers"):
        loader(tmp_path / "small", world_size=2, num_workers=2, batch_size=4)
    write_dataset(str(tmp_path / "classes"), [10], num_classes=9)
    with pytest.raises(DatasetError, match="set model.num_classes >= 9"):
        loader(tmp_path / "classes")


def test_the_encoder_output_streams(tmp_path):
    write_digits(tmp_path / "digits", limit=200)
    assert (
        encode_latents.main(
            [
                "--input",
                str(tmp_path / "digits"),
                "--output",
                str(tmp_path / "latents"),
                "--vae",
                "pixel",
                "--resolution",
                "8",
                "--shard-size",
                "50",
                "--flip",
            ]
        )
        == 0
    )
    source = LatentLoader(str(tmp_path / "latents"), batch_size=16, null_label=10, num_workers=2)
    assert source.latent_shape == (3, 8, 8)
    with deadline(60):
        batches = list(itertools.islice(source, 12))
    latents = torch.cat([b.latents for b in batches])
    assert latents.shape == (192, 3, 8, 8) and latents.min() >= -1 and latents.max() <= 1
    labels = torch.cat([b.labels for b in batches])
    assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) > 5


# Object storage: a moto S3 server on loopback.


def s3_dataset(s3, shard_sizes):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    manifest = write_dataset(f"{s3.bucket}/data", shard_sizes, fs=fs)
    return fs, manifest


def test_s3_truncated_and_missing_shards_are_skipped_and_counted(s3, caplog):
    fs, manifest = s3_dataset(s3, UNEVEN)
    truncated, missing = manifest["shards"][2]["name"], manifest["shards"][6]["name"]
    fs.pipe_file(f"{s3.bucket}/data/{truncated}", fs.cat_file(f"{s3.bucket}/data/{truncated}")[:5000])
    fs.rm_file(f"{s3.bucket}/data/{missing}")

    ranks = [
        loader(s3.url("data"), rank=r, world_size=2, num_workers=2, storage_options=s3.storage_options)
        for r in range(2)
    ]
    epochs, skipped = [], 0
    for rank in ranks:
        batches = []
        with deadline(120):
            for batch in rank:
                if batch.epoch:
                    break
                batches.append(batch.keys)
                skipped_in_epoch_0 = rank.skipped_shards
        epochs.append({0: batches})
        skipped += skipped_in_epoch_0
    assert len(epochs[0][0]) == len(epochs[1][0]) == ranks[0].batches_per_epoch(0)  # still equal: no hang
    assert skipped == 2  # each bad shard counted once, however many passes its slot needed
    keys = {k for e in epochs for batch in e[0] for k in batch}
    assert not {k for k in keys if k.startswith(("s002/", "s006/"))}

    # The warnings name the shards (read in-process here: worker logs go to the workers' stderr).
    in_process = loader(s3.url("data"), num_workers=0, storage_options=s3.storage_options)
    with caplog.at_level("WARNING"):
        take(in_process, in_process.batches_per_epoch(0))
    assert f"skipping shard {s3.url('data', truncated)}: 5000 bytes, the manifest says" in caplog.text
    assert f"skipping shard {s3.url('data', missing)}" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_s3_strict_mode_fails_naming_the_shard(s3, num_workers):
    fs, manifest = s3_dataset(s3, [20, 20, 20])
    fs.rm_file(f"{s3.bucket}/data/{manifest['shards'][1]['name']}")
    source = loader(
        s3.url("data"), num_workers=num_workers, strict=True, storage_options=s3.storage_options, shuffle_shards=1
    )
    with deadline(60), pytest.raises(DatasetError, match=r"shard s3://.*/data/000001-000\.tar cannot be read"):
        for _ in source:
            pass


def test_workers_forked_after_s3fs_was_used_do_not_hang(s3):
    fs, _ = s3_dataset(s3, [30, 30, 30, 30])
    assert fs.ls(f"{s3.bucket}/data")  # the parent's s3fs has a live event loop and connections now
    source = loader(s3.url("data"), num_workers=2, storage_options=s3.storage_options)
    with deadline(60):
        batches = list(itertools.islice(source, 20))
    assert len(batches) == 20 and all(b.latents.shape == (4, 4, 4, 4) for b in batches)


def test_state_dict_keys_are_plain_data(tmp_path):
    write_dataset(str(tmp_path), UNEVEN)
    source = loader(tmp_path, num_workers=2)
    take(source, 3)
    state = source.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert np.asarray([p["batch"] for p in state["positions"]]).sum() == 3


def test_a_process_exits_while_its_workers_still_run(tmp_path):
    """Workers ignore SIGTERM (SLURM's preemption signal reaches them too), so multiprocessing's
    exit handler, which terminates and joins them, would hang a rank whose loader is still alive."""
    write_dataset(str(tmp_path / "data"), [40, 40], shape=(3, 8, 8), num_classes=10)
    code = (
        "from diffusion_dist.data.stream import LatentLoader\n"
        f"data = LatentLoader({str(tmp_path / 'data')!r}, batch_size=8, null_label=10, rank=0, world_size=1,"
        " num_workers=1, seed=0)\n"
        "batches = iter(data)\n"
        "next(batches)\n"
        "print('exiting with a live worker')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "exiting with a live worker" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
