"""The streaming latent dataset: lanes, one global order on any number of ranks and workers,
per-sample draws, exact resume across world sizes, failures, object storage."""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from data_tools import encode_latents
from data_tools.make_digits import write_digits
from diffusion_dist.data import stream as stream_module
from diffusion_dist.data.manifest import DatasetError, manifest_bytes
from diffusion_dist.data.stream import (
    STREAM_OBJECTIVE,
    STREAM_POSTERIOR,
    LatentLoader,
    ShardReader,
    caption_choices,
    chunk_sizes,
    epoch_plan,
    flip_bits,
    rank_lanes,
    sample_seeds,
    steps_in_epoch,
)
from diffusion_dist.diffusion import GaussianDiffusion
from diffusion_dist.objectives import DiffusionObjective
from tests.conftest import ROOT
from tests.latent_data import NULL_TEXT, captions_of, null_text, text_rows, write_dataset

UNEVEN = [37, 5, 61, 12, 29, 3, 44, 18, 50, 7, 23, 31, 2, 40]  # 362 samples in 14 shards
OBJECTIVE = DiffusionObjective(GaussianDiffusion.from_schedule("linear", 50), 5, p_uncond=0.3)


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


def take(source: LatentLoader, n: int) -> list[list[str]]:
    with deadline(120):
        return [b.keys for b in itertools.islice(source, n)]


def global_steps(ranks: list[LatentLoader], steps: int) -> list[dict]:
    """The first `steps` global batches, each rank's micro batches joined in rank order:
    {"keys", "epoch", "positions", "latents", "draws"} per step."""
    per_rank = []
    for rank in ranks:
        with deadline(120):
            per_rank.append(list(itertools.islice(rank, steps * rank.accumulation)))
    out = []
    for step in range(steps):
        batches = [
            b
            for rank, got in zip(ranks, per_rank, strict=True)
            for b in got[step * rank.accumulation :][: rank.accumulation]
        ]
        out.append(
            {
                "keys": [k for b in batches for k in b.keys],
                "epoch": {b.epoch for b in batches},
                "positions": torch.cat([b.positions for b in batches]),
                "latents": torch.cat([b.latents for b in batches]),
                "draws": {name: torch.cat([b.draws[name] for b in batches]) for name in batches[0].draws},
                "text": {name: torch.cat([b.text[name] for b in batches]) for name in batches[0].text},
                "captions": [c for b in batches for c in b.captions],
            }
        )
    return out


def assert_same_steps(got: list[dict], expected: list[dict]) -> None:
    assert [s["keys"] for s in got] == [s["keys"] for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["epoch"] == b["epoch"] and len(a["epoch"]) == 1
        assert torch.equal(a["positions"], b["positions"])
        assert torch.equal(a["latents"], b["latents"])
        assert a["draws"].keys() == b["draws"].keys() and all(
            torch.equal(a["draws"][k], b["draws"][k]) for k in a["draws"]
        )
        assert a["text"].keys() == b["text"].keys() and all(torch.equal(a["text"][k], b["text"][k]) for k in a["text"])
        assert a["captions"] == b["captions"]


def test_epoch_plan_deals_every_shard_once_and_balances_lanes():
    sizes = tuple(UNEVEN)
    for epoch in range(3):
        plan = epoch_plan(sizes, 4, seed=7, epoch=epoch)
        assert sorted(s for lane in plan for s in lane) == list(range(len(sizes)))
        totals = [sum(sizes[s] for s in lane) for lane in plan]
        assert max(totals) - min(totals) <= max(sizes)
        assert epoch_plan(sizes, 4, seed=7, epoch=epoch) == plan  # a pure function
    assert epoch_plan(sizes, 4, 7, 0) != epoch_plan(sizes, 4, 7, 1)
    assert steps_in_epoch(epoch_plan(sizes, 4, 7, 0), sizes, chunk_sizes(16, 4)) >= (sum(sizes) - 4 * max(sizes)) // 16


def test_chunks_and_rank_slices_cover_the_global_batch_once():
    assert chunk_sizes(12, 4) == [3, 3, 3, 3] and chunk_sizes(14, 4) == [4, 4, 3, 3]
    for batch, lanes, world in [(12, 4, 1), (12, 4, 2), (12, 4, 3), (14, 4, 7), (16, 6, 4)]:
        chunks = chunk_sizes(batch, lanes)
        taken = [
            sum(chunks[:lane]) + k
            for rank in range(world)
            for lane, first, stop in rank_lanes(chunks, rank, world)
            for k in range(first, stop)
        ]
        assert taken == list(range(batch))  # every position once, ranks in order
    assert rank_lanes(chunk_sizes(12, 4), 1, 3) == [(1, 1, 3), (2, 0, 2)]  # lanes 1 and 2 are shared with ranks 0, 2


@pytest.fixture
def uneven(tmp_path):
    write_dataset(str(tmp_path), UNEVEN)
    return tmp_path


def four_lanes(url, **kwargs) -> dict:
    """The state of a run first started on 2 ranks × 2 workers: 4 lanes, global batch 12, micro batch 2."""
    return loader(
        url, world_size=2, num_workers=2, batch_size=2, global_batch=12, draws=OBJECTIVE.draw, **kwargs
    ).state_dict()


def ranks_of(url, world_size, num_workers, state, **kwargs) -> list[LatentLoader]:
    ranks = []
    for rank in range(world_size):
        source = loader(
            url, rank, world_size, num_workers, batch_size=2, global_batch=12, draws=OBJECTIVE.draw, **kwargs
        )
        source.load_state_dict(json.loads(json.dumps(state)))  # the state survives serialisation
        ranks.append(source)
    return ranks


def test_global_batches_are_the_same_on_any_number_of_ranks_and_workers(uneven):
    state = four_lanes(uneven)
    reference = ranks_of(uneven, 1, 0, state)
    per_epoch = reference[0].steps_per_epoch(0)
    expected = global_steps(reference, per_epoch + 3)  # into the next epoch
    for world_size, num_workers in itertools.product([1, 2, 3], [0, 1, 2]):
        if (world_size, num_workers) != (1, 0):
            assert_same_steps(global_steps(ranks_of(uneven, world_size, num_workers, state), per_epoch + 3), expected)

    epoch_0 = [k for s in expected[:per_epoch] for k in s["keys"]]
    assert len(epoch_0) == len(set(epoch_0)) == 12 * per_epoch, "a sample was taken twice in one epoch"
    # Documented remainder: each of the 4 lanes leaves out < largest shard + its chunk.
    assert len(epoch_0) > sum(UNEVEN) - 4 * (max(UNEVEN) + 3)
    assert [s["epoch"] for s in expected] == [{0}] * per_epoch + [{1}] * 3
    assert expected[0]["keys"] != expected[per_epoch]["keys"]  # reshuffled per epoch
    assert torch.equal(expected[1]["positions"], torch.arange(12, 24))
    assert len({k.split("/")[0] for k in epoch_0[:24]}) > 4, "lanes should mix several shards"


def test_each_samples_draws_depend_only_on_its_global_index(uneven):
    """Recomputed for one sample alone: its flip, its posterior ε and the objective's draws."""
    state = four_lanes(uneven)
    batch = list(itertools.islice(ranks_of(uneven, 3, 1, state)[1], 9))[-1]  # step 4 of rank 1 of 3
    assert batch.epoch == 0 and batch.positions.tolist() == [4 * 12 + 4, 4 * 12 + 5]
    for i, index in enumerate(batch.positions.tolist()):
        alone = OBJECTIVE.draw(
            torch.Generator().manual_seed(int(sample_seeds(7, 0, [index], STREAM_OBJECTIVE)[0])), (4, 4, 4)
        )
        assert all(torch.equal(batch.draws[name][i], alone[name]) for name in alone)
        eps = torch.randn(
            (4, 4, 4), generator=torch.Generator().manual_seed(int(sample_seeds(7, 0, [index], STREAM_POSTERIOR)[0]))
        )
        mean = -1.0 if flip_bits(7, 0, [index])[0] else 1.0
        std = math.exp(float(np.float16(2 * math.log(0.5))) / 2)
        torch.testing.assert_close(batch.latents[i], ((mean + std * eps) - 0.2) * 0.5)
    assert set(batch.draws) == {"t", "eps", "xi", "drop"} and batch.draws["eps"].shape == (2, 4, 4, 4)


def test_resume_on_other_world_sizes_continues_the_global_sequence(uneven):
    """2 ranks × 2 workers → killed → 1 rank in-process → killed → 3 ranks × 1 worker, into the next epoch."""
    state = four_lanes(uneven)
    per_epoch = ranks_of(uneven, 1, 0, state)[0].steps_per_epoch(0)
    total = per_epoch + 4
    expected = global_steps(ranks_of(uneven, 2, 2, state), total)

    got = []
    for (world_size, num_workers), steps in zip([(2, 2), (1, 0), (3, 1)], [7, 9, total - 16], strict=True):
        ranks = ranks_of(uneven, world_size, num_workers, state)
        got += global_steps(ranks, steps)
        states = [r.state_dict() for r in ranks]
        assert all(s == states[0] for s in states), "every rank holds the same state"
        state = states[0]
    assert_same_steps(got, expected)
    keys = [k for s in got[:per_epoch] for k in s["keys"]]
    assert len(keys) == len(set(keys)), "a sample was skipped or repeated across the changes"


def test_a_state_taken_inside_a_step_resumes_at_the_steps_first_micro_batch(uneven):
    first = loader(uneven, batch_size=2, global_batch=6)  # 3 micro batches a step
    whole = take(loader(uneven, batch_size=2, global_batch=6), 6)
    assert take(first, 4) == whole[:4]
    assert first.state_dict()["step"] == 1
    assert take(first, 2) == whole[4:6]  # the same object goes on where it stopped
    resumed = loader(uneven, batch_size=2, global_batch=6)
    resumed.load_state_dict({**first.state_dict(), "step": 1})
    assert take(resumed, 3) == whole[3:6]


def test_order_is_a_pure_function_of_the_seed(uneven):
    first = take(loader(uneven, num_workers=2), 12)
    assert take(loader(uneven, num_workers=2), 12) == first
    assert take(loader(uneven, num_workers=2, seed=8), 12) != first


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_reads_no_consumed_group_again(uneven, monkeypatch, world_size):
    first = loader(uneven, batch_size=4, shuffle_shards=2)  # one lane
    take(first, 40)  # 160 samples: well past the first groups of shards
    state = first.state_dict()

    reads = []
    original = stream_module._get_object
    monkeypatch.setattr(stream_module, "_get_object", lambda fs, path: reads.append(path) or original(fs, path))
    for rank in range(world_size):
        resumed = loader(uneven, rank=rank, world_size=world_size, batch_size=4 // world_size, global_batch=4)
        resumed.load_state_dict(state)
        take(resumed, 1)
    shards = epoch_plan(tuple(UNEVEN), 1, 7, 0)[0]
    groups = [shards[i : i + 2] for i in range(0, len(shards), 2)]
    consumed = list(itertools.takewhile(lambda g: sum(UNEVEN[s] for s in g) <= 160, itertools.accumulate(groups)))
    consumed_shards = {f"{s:06d}-000.tar" for s in consumed[-1]} if consumed else set()
    assert len(consumed_shards) >= 4
    assert reads and not {p.rsplit("/", 1)[-1] for p in reads} & consumed_shards


def test_one_get_per_shard_per_epoch(uneven, monkeypatch):
    """Two ranks reading two lanes: every shard fetched once in the epoch, by the rank whose lane holds it."""
    reads = []
    original = stream_module._get_object
    monkeypatch.setattr(stream_module, "_get_object", lambda fs, path: reads.append(path) or original(fs, path))
    for rank in range(2):
        source = loader(uneven, rank=rank, world_size=2, num_workers=0, batch_size=4)
        assert source.order.lanes == 2
        take(source, source.batches_per_epoch(0))
    names = [p.rsplit("/", 1)[-1] for p in reads]
    assert sorted(names) == sorted(f"{s:06d}-000.tar" for s in range(len(UNEVEN)))


def test_a_changed_global_batch_or_seed_is_refused(uneven, caplog):
    first = loader(uneven, batch_size=2, global_batch=12)
    take(first, 6 * 3)  # 3 steps
    state = first.state_dict()
    other = loader(uneven, batch_size=2, global_batch=8)
    with pytest.raises(
        DatasetError, match=r"global batch \(train.global_batch_size\) was 12 .* is 8 now.*allow_batch_change"
    ):
        other.load_state_dict(state)
    other.load_state_dict(state, allow_batch_change=True)
    assert "the rest of epoch 0 (3 of its global batches were taken) is skipped" in caplog.text
    assert other.epoch == 1 and next(iter(other)).epoch == 1
    with pytest.raises(DatasetError, match=r"run.seed was 7 .* is 8 now; .* set run.seed=7 to resume"):
        loader(uneven, batch_size=2, global_batch=12, seed=8).load_state_dict(state)
    with pytest.raises(DatasetError, match="data.shuffle_shards was 2"):
        loader(uneven, batch_size=2, global_batch=12, shuffle_shards=3).load_state_dict(state)
    with pytest.raises(DatasetError, match="shard list differs"):
        loader(uneven, batch_size=2, global_batch=12).load_state_dict({**state, "shards": "0123"})


def test_state_is_plain_data_and_keeps_the_runs_lanes(uneven):
    source = loader(uneven, num_workers=2, batch_size=2, global_batch=8)
    take(source, 6)
    state = source.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert {k: state[k] for k in ("epoch", "step", "lanes", "global_batch", "seed", "shuffle_shards")} == {
        "epoch": 0,
        "step": 1,
        "lanes": 2,
        "global_batch": 8,
        "seed": 7,
        "shuffle_shards": 2,
    }
    elsewhere = loader(uneven, rank=1, world_size=4, num_workers=2, batch_size=2, global_batch=8)
    assert elsewhere.order.lanes == 8
    elsewhere.load_state_dict(state)
    assert elsewhere.state_dict() == state  # the run's 2 lanes, whatever the new layout would choose


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
    assert batch.draws == {}  # no draw function, no draws


def test_the_objectives_draws_have_their_distributions(tmp_path):
    write_dataset(str(tmp_path), [200, 200], shape=(4, 8, 8))
    draws = next(iter(loader(tmp_path, batch_size=256, draws=OBJECTIVE.draw))).draws
    assert draws["t"].dtype == torch.long and 0 <= draws["t"].min() and draws["t"].max() < 50
    assert len(draws["t"].unique()) > 40
    assert draws["drop"].float().mean().item() == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / 256))
    for name in ("eps", "xi"):
        assert draws[name].shape == (256, 4, 8, 8)
        assert draws[name].mean().item() == pytest.approx(0, abs=0.02) and draws[name].std().item() == pytest.approx(
            1, rel=0.02
        )
    assert not torch.equal(draws["eps"], draws["xi"])


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
    with pytest.raises(DatasetError, match="cannot give each of 4 lanes"):
        loader(tmp_path / "small", world_size=2, num_workers=2, batch_size=4)
    write_dataset(str(tmp_path / "classes"), [10], num_classes=9)
    with pytest.raises(DatasetError, match="set model.num_classes >= 9"):
        loader(tmp_path / "classes")
    with pytest.raises(ValueError, match="global batch 10 is not a multiple of batch size 4 × world size 1"):
        loader(tmp_path / "classes", global_batch=10)


def test_a_shard_with_other_latents_is_skipped_or_fails_in_strict_mode(tmp_path, caplog):
    """A shard whose latents have another shape (its manifest entry otherwise right) must not reach np.stack."""
    manifest = write_dataset(str(tmp_path / "data"), [30, 30, 30])
    wrong = write_dataset(str(tmp_path / "wrong"), [30, 30], shape=(4, 8, 8))["shards"][1]
    (tmp_path / "data" / wrong["name"]).write_bytes((tmp_path / "wrong" / wrong["name"]).read_bytes())
    manifest["shards"][1] = wrong
    (tmp_path / "data" / "manifest.json").write_bytes(manifest_bytes(manifest))

    source = loader(tmp_path / "data", batch_size=4, shuffle_shards=1)
    keys = [k for batch in take(source, source.batches_per_epoch(0)) for k in batch]
    assert keys and not [k for k in keys if k.startswith("s001/")] and source.skipped_shards == 1
    assert "000001-000.tar: s001/0000.latent.npy holds float16 [8, 8, 8], the manifest says float16 [8, 4, 4]" in (
        caplog.text
    )
    with pytest.raises(DatasetError, match=r"shard .*/000001-000\.tar cannot be read: s001/0000.latent.npy holds"):
        take(loader(tmp_path / "data", batch_size=4, shuffle_shards=1, strict=True), 30)


class FlakyStorage:
    """_get_object that fails `failures` times per path (or only for `only`) with a transient error, then reads."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionResetError, only: str = "") -> None:
        self.failures, self.error, self.only, self.calls = failures, error, only, {}
        self.original = stream_module._get_object

    def __call__(self, fs, path):
        self.calls[path] = self.calls.get(path, 0) + 1
        if self.calls[path] <= self.failures and path.endswith(self.only):
            raise self.error(f"connection reset reading {path}")
        return self.original(fs, path)


def reader(url, read_timeout: float, closing: threading.Event | None = None) -> ShardReader:
    return ShardReader(loader(url).info, False, read_timeout, closing or threading.Event())


def test_transient_errors_are_retried_and_do_not_drop_the_shard(uneven, monkeypatch, caplog):
    monkeypatch.setattr(stream_module, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(stream_module, "_get_object", FlakyStorage(failures=2))
    unreadable = set()
    samples, skipped = reader(uneven, read_timeout=30).read_group([0, 1], unreadable)
    assert len(samples) == UNEVEN[0] + UNEVEN[1] and not skipped and not unreadable
    assert "connection reset" in caplog.text and "retry 2" in caplog.text

    # Still failing at the end of read_timeout: skipped in this group, not for the rest of the epoch.
    monkeypatch.setattr(stream_module, "_get_object", FlakyStorage(failures=10**6))
    samples, skipped = reader(uneven, read_timeout=0.3).read_group([0, 1], unreadable)
    assert not samples and skipped == ["000000-000.tar", "000001-000.tar"] and not unreadable
    # A missing shard is skipped for the rest of the epoch.
    monkeypatch.setattr(stream_module, "_get_object", FlakyStorage(failures=1, error=FileNotFoundError))
    samples, skipped = reader(uneven, read_timeout=30).read_group([2], unreadable)
    assert not samples and skipped == ["000002-000.tar"] and unreadable == {2}


def test_a_retrying_read_stays_responsive(uneven, monkeypatch):
    """Signal handlers of the main process run while its in-process loader waits for a read that is
    retried, and closing the stream ends the retry's wait at once."""
    monkeypatch.setattr(stream_module, "RETRY_BASE_S", 0.2)
    monkeypatch.setattr(stream_module, "_get_object", FlakyStorage(failures=2))  # ≥ 0.3 s a shard
    handled = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: handled.append(time.monotonic()))
    try:
        threading.Timer(0.2, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)).start()
        with deadline(60):
            next(iter(loader(uneven, read_timeout=60)))
        assert handled and handled[0] < time.monotonic() - 0.2  # handled while it waited, not after
    finally:
        signal.signal(signal.SIGUSR1, previous)

    monkeypatch.setattr(stream_module, "_get_object", FlakyStorage(failures=10**6))
    closing = threading.Event()
    threading.Timer(0.3, closing.set).start()
    started = time.monotonic()
    _, skipped = reader(uneven, read_timeout=600, closing=closing).read_group([0], set())
    assert skipped and time.monotonic() - started < 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_stopping_loader_gives_up_its_retries(uneven, monkeypatch, num_workers):
    """With storage stuck on a shard, stop() (the trainer's preemption flag) lets the rank finish its
    step at once instead of retrying for read_timeout: it reaches the boundary where it saves."""
    stuck = f"{epoch_plan(tuple(UNEVEN), 1, 7, 0)[0][0]:06d}-000.tar"  # in the first group of the only lane
    monkeypatch.setattr(stream_module, "RETRY_BASE_S", 0.2)
    monkeypatch.setattr(stream_module, "_get_object", FlakyStorage(failures=10**6, only=stuck))
    stopped = threading.Event()
    source = loader(uneven, num_workers=num_workers, read_timeout=600, stop=stopped.is_set)
    threading.Timer(0.5, stopped.set).start()
    started = time.monotonic()
    with deadline(60):
        batch = next(iter(source))
    assert time.monotonic() - started < 10 and source.skipped_shards == 1
    assert not [k for k in batch.keys if k.startswith(f"s{stuck[3:6]}/")]


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


# Text: captions' encoder outputs, one caption per sample and epoch, null-text dropout at load time.

TEXT = (6, 8, 4)  # L tokens, D hidden, P pooled


@pytest.fixture
def captioned(tmp_path):
    write_dataset(str(tmp_path), UNEVEN, text=TEXT)  # K = 1, 2 or 3 captions a sample
    return tmp_path


def check_text(batch, pooled: int | None = TEXT[2]) -> None:
    """Each sample's text is its chosen caption's rows (from caption_choices at its global index), or the
    null text exactly where its draws["drop_text"] (else draws["drop"]) is set; captions in key order."""
    length, hidden = TEXT[:2]
    n = len(batch.keys)
    assert batch.text["embedding"].shape == (n, length, hidden) and batch.text["embedding"].dtype == torch.bfloat16
    assert batch.text["mask"].shape == (n, length) and batch.text["mask"].dtype == torch.bool
    if pooled is None:
        assert "pooled" not in batch.text
    else:
        assert batch.text["pooled"].shape == (n, pooled) and batch.text["pooled"].dtype == torch.bfloat16
    null = null_text(length, hidden, pooled)
    for i, key in enumerate(batch.keys):
        shard, index = int(key[1:4]), int(key[5:])
        captions = captions_of(shard, index, 3)
        choice = int(caption_choices(7, batch.epoch, batch.positions[i : i + 1].numpy(), [len(captions)])[0])
        assert batch.captions[i] == captions[choice]
        dropped = batch.draws.get("drop_text", batch.draws["drop"])[i]
        expected = null if dropped else text_rows(shard, index, choice, length, hidden, pooled)
        for name, value in expected.items():
            assert torch.equal(batch.text[name][i], value.to(batch.text[name].dtype)), (key, name)


@pytest.mark.parametrize("pooled", [4, None])
def test_text_batches_carry_each_samples_chosen_caption_or_the_null_text(tmp_path, pooled):
    write_dataset(str(tmp_path), UNEVEN, text=(*TEXT[:2], pooled))
    source = loader(tmp_path, num_workers=2, batch_size=8, draws=OBJECTIVE.draw, text=True)
    assert source.null_text.keys() == null_text(*TEXT[:2], pooled).keys()
    with deadline(120):
        batches = list(itertools.islice(source, 10))
    for batch in batches:
        check_text(batch, pooled)
    drop = torch.cat([b.draws["drop"] for b in batches])
    assert 0 < drop.sum() < len(drop)  # both kinds were checked
    chosen = {c.rsplit(" ", 1)[1] for b in batches for c in b.captions}
    assert chosen == {"0", "1", "2"}


def test_a_class_and_text_model_drops_each_condition_alone_too(tmp_path):
    """DiffusionObjective(text=True) with classes: the label and the text are each dropped with p alone
    on top of the joint drop, the shared draws are those of the class model, and the loader nulls the
    text exactly where "drop_text" is set."""
    p, diffusion = 0.3, GaussianDiffusion.from_schedule("linear", 50)
    both = DiffusionObjective(diffusion, 5, p_uncond=p, text=True)
    generator = torch.Generator()
    draws = [both.draw(generator.manual_seed(i), (4, 2, 2)) for i in range(20000)]
    for i in (0, 1, 2):
        shared = OBJECTIVE.draw(generator.manual_seed(i), (4, 2, 2))
        assert all(torch.equal(draws[i][k], shared[k]) for k in ("t", "eps", "xi"))
        assert not shared["drop"] or (draws[i]["drop"] and draws[i]["drop_text"])  # the joint drop is kept
    label = torch.stack([d["drop"] for d in draws]).double()
    text = torch.stack([d["drop_text"] for d in draws]).double()
    # Joint J, label alone a, text alone b, each Bernoulli(p): drop = J | a, drop_text = J | b.
    expected = {
        "both": p + (1 - p) * p * p,
        "label alone": (1 - p) * p * (1 - p),
        "text alone": (1 - p) * (1 - p) * p,
    }
    measured = {
        "both": (label * text).mean(),
        "label alone": (label * (1 - text)).mean(),
        "text alone": ((1 - label) * text).mean(),
    }
    for name, value in expected.items():
        assert abs(measured[name] - value) < 0.015, (name, float(measured[name]), value)
    # Text-only and class-only models draw no "drop_text".
    assert "drop_text" not in DiffusionObjective(diffusion, 0, text=True).draw(generator, (4, 2, 2))

    write_dataset(str(tmp_path), UNEVEN, text=TEXT)
    source = loader(tmp_path, num_workers=0, batch_size=8, draws=both.draw, text=True)
    batches = list(itertools.islice(source, 10))
    for batch in batches:
        check_text(batch)
    drops = torch.cat([b.draws["drop"] for b in batches]), torch.cat([b.draws["drop_text"] for b in batches])
    assert (drops[0] != drops[1]).any()  # the rows checked include drops of one condition alone


def test_captions_and_text_are_the_same_on_any_number_of_ranks_and_workers(captioned):
    state = four_lanes(captioned, text=True)
    steps = ranks_of(captioned, 1, 0, state, text=True)[0].steps_per_epoch(0) + 3  # into the next epoch
    expected = global_steps(ranks_of(captioned, 1, 0, state, text=True), steps)
    for world_size, num_workers in [(2, 2), (3, 1)]:
        assert_same_steps(global_steps(ranks_of(captioned, world_size, num_workers, state, text=True), steps), expected)
    assert expected[0]["text"]["embedding"].shape == (12, *TEXT[:2])


def test_a_resumed_run_continues_the_same_text(captioned):
    """2 ranks × 2 workers → killed mid-epoch → 1 rank → killed → 3 ranks × 1 worker, into the next epoch."""
    state = four_lanes(captioned, text=True)
    total = ranks_of(captioned, 1, 0, state, text=True)[0].steps_per_epoch(0) + 2
    expected = global_steps(ranks_of(captioned, 2, 2, state, text=True), total)
    got = []
    for (world_size, num_workers), steps in zip([(2, 2), (1, 0), (3, 1)], [7, 9, total - 16], strict=True):
        ranks = ranks_of(captioned, world_size, num_workers, state, text=True)
        got += global_steps(ranks, steps)
        state = ranks[0].state_dict()
    assert_same_steps(got, expected)


def test_the_caption_choice_changes_by_epoch_and_covers_every_caption(tmp_path):
    write_dataset(str(tmp_path), [6, 6], text=TEXT)  # one lane, 3 steps of 4: every sample once an epoch
    source = loader(tmp_path, batch_size=4, text=True)
    taken: dict[str, list[str]] = {}
    with deadline(120):
        for batch in itertools.islice(source, 3 * 24):
            for key, caption in zip(batch.keys, batch.captions, strict=True):
                taken.setdefault(key, []).append(caption)
    assert len(taken) == 12 and all(len(c) == 24 for c in taken.values())
    for key, captions in taken.items():
        shard, index = int(key[1:4]), int(key[5:])
        assert set(captions) == set(captions_of(shard, index, 3))  # all K of them over 24 epochs
    # A pure function of (seed, epoch, index): the same again; another seed, other choices.
    again = [b.captions for b in itertools.islice(loader(tmp_path, batch_size=4, text=True), 9)]
    assert again == [b.captions for b in itertools.islice(loader(tmp_path, batch_size=4, text=True), 9)]
    assert again != [b.captions for b in itertools.islice(loader(tmp_path, batch_size=4, text=True, seed=8), 9)]
    # Uniform over K.
    counts = np.bincount(caption_choices(7, 0, np.arange(30_000), [3] * 30_000), minlength=3)
    assert np.all(np.abs(counts - 10_000) < 4 * math.sqrt(30_000 * 2 / 9))


def test_a_loader_without_text_does_not_decode_the_text_members(captioned, monkeypatch):
    with_text = next(iter(loader(captioned, batch_size=8, draws=OBJECTIVE.draw, text=True)))

    def not_called(*args):
        raise AssertionError("text members decoded by a loader without text")

    monkeypatch.setattr(stream_module, "_npy_layout", not_called)
    monkeypatch.setattr(stream_module, "_fill_text", not_called)
    source = loader(captioned, num_workers=0, batch_size=8, draws=OBJECTIVE.draw)
    batch = next(iter(source))
    assert batch.text == {} and batch.captions == [] and source.null_text is None
    assert batch.keys == with_text.keys and torch.equal(batch.latents, with_text.latents)
    assert all(torch.equal(batch.draws[k], with_text.draws[k]) for k in batch.draws)


def test_text_without_a_text_record_is_a_clear_error(tmp_path):
    write_dataset(str(tmp_path / "plain"), [20, 20])
    with pytest.raises(DatasetError, match=r"data.url=.*plain has no text embeddings .*re-encode this one"):
        loader(tmp_path / "plain", text=True)
    manifest = write_dataset(str(tmp_path / "data"), [20, 20], text=TEXT)
    manifest["text"]["encoder"]["hidden_size"] = None
    (tmp_path / "data" / "manifest.json").write_bytes(manifest_bytes(manifest))
    with pytest.raises(DatasetError, match="text.encoder.hidden_size is missing"):
        loader(tmp_path / "data", text=True)
    manifest["text"]["encoder"]["hidden_size"] = 16
    (tmp_path / "data" / "manifest.json").write_bytes(manifest_bytes(manifest))
    wrong_shape = r"null_text.safetensors holds .*'embedding': \(6, 8\).* gives .*'embedding': \(6, 16\).*re-encode"
    with pytest.raises(DatasetError, match=wrong_shape):
        loader(tmp_path / "data", text=True)
    (tmp_path / "data" / NULL_TEXT).unlink()
    with pytest.raises(DatasetError, match="null_text.safetensors is missing; re-run encode_latents"):
        loader(tmp_path / "data", text=True)


def test_a_shard_with_other_text_is_skipped_or_fails_in_strict_mode(tmp_path, caplog):
    manifest = write_dataset(str(tmp_path / "data"), [30, 30, 30], text=TEXT)
    wrong = write_dataset(str(tmp_path / "wrong"), [30, 30], text=(6, 16, 4))["shards"][1]
    (tmp_path / "data" / wrong["name"]).write_bytes((tmp_path / "wrong" / wrong["name"]).read_bytes())
    manifest["shards"][1] = wrong
    (tmp_path / "data" / "manifest.json").write_bytes(manifest_bytes(manifest))

    source = loader(tmp_path / "data", batch_size=4, shuffle_shards=1, text=True)
    keys = [k for batch in take(source, source.batches_per_epoch(0)) for k in batch]
    assert keys and not [k for k in keys if k.startswith("s001/")] and source.skipped_shards == 1
    assert "s001/0000.text.npy holds uint16 [2, 6, 16], the manifest's text encoder gives uint16 [K ≥ 1, 6, 8]" in (
        caplog.text
    )
    with pytest.raises(DatasetError, match=r"000001-000\.tar cannot be read: s001/0000.text.npy holds"):
        take(loader(tmp_path / "data", batch_size=4, shuffle_shards=1, strict=True, text=True), 30)
    # Without text the same shard is fine: its latents are right.
    plain = loader(tmp_path / "data", batch_size=4, shuffle_shards=1)
    take(plain, plain.batches_per_epoch(0))
    assert plain.skipped_shards == 0


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
        epochs.append(batches)
        skipped += skipped_in_epoch_0
    assert len(epochs[0]) == len(epochs[1]) == ranks[0].batches_per_epoch(0)  # still equal: no hang
    assert skipped == 2  # each bad shard counted once, however many passes its lane needed
    keys = {k for batches in epochs for batch in batches for k in batch}
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


def test_s3_text_streams_with_its_null_text(s3):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    write_dataset(f"{s3.bucket}/data", [20, 20, 20], fs=fs, text=TEXT)
    source = loader(s3.url("data"), num_workers=2, draws=OBJECTIVE.draw, storage_options=s3.storage_options, text=True)
    assert torch.equal(source.null_text["pooled"], null_text(*TEXT)["pooled"])
    with deadline(60):
        for batch in itertools.islice(source, 6):
            check_text(batch)


def test_workers_forked_after_s3fs_was_used_do_not_hang(s3):
    fs, _ = s3_dataset(s3, [30, 30, 30, 30])
    assert fs.ls(f"{s3.bucket}/data")  # the parent's s3fs has a live event loop and connections now
    source = loader(s3.url("data"), num_workers=2, storage_options=s3.storage_options)
    with deadline(60):
        batches = list(itertools.islice(source, 20))
    assert len(batches) == 20 and all(b.latents.shape == (4, 4, 4, 4) for b in batches)


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
