"""Checkpoints in-process on one rank: which checkpoints count as committed, a TrainState save ->
resume round trip that restores everything the next step depends on, files that hold no pickles,
and a format-1 checkpoint with a pickle payload refused before anything unpickles it. (Resume
after kill -9 on 2 ranks, and across world sizes and ZeRO stages, are in test_train.py and
test_elastic.py; the store's commit protocol in test_store.py.)"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from diffusion_dist.config import load_config
from diffusion_dist.data.stream import LatentLoader
from diffusion_dist.export import ExportInfo
from diffusion_dist.objectives import OBJECTIVES
from diffusion_dist.train.checkpoint import TrainingAborted, TrainState, committed_steps
from diffusion_dist.train.ema import EMA
from diffusion_dist.train.engine import Engine, UnsafeCheckpoint
from tests.latent_data import write_dataset


def legacy_checkpoint(root: Path, step: int, files: dict[str, bytes], marker: dict[str, int] | None) -> Path:
    """A format-1 checkpoint directory: its files and, unless None, its COMMITTED.json."""
    directory = root / f"step-{step}"
    directory.mkdir(parents=True)
    for name, data in {"shared.pt": b"0", **files}.items():
        (directory / name).write_bytes(data)
    if marker is not None:
        (directory / "COMMITTED.json").write_text(json.dumps({"step": step, "files": {"shared.pt": 1, **marker}}))
    return directory


def test_format_1_checkpoints_count_when_their_marker_matches(tmp_path):
    good, sizes = {"a.pt": b"1234", "b.pt": b"56"}, {"a.pt": 4, "b.pt": 2}
    legacy_checkpoint(tmp_path, 5, good, sizes)
    legacy_checkpoint(tmp_path, 40, good, sizes)
    legacy_checkpoint(tmp_path, 100, good, None)  # killed before the marker
    legacy_checkpoint(tmp_path, 90, {"a.pt": b"12"}, sizes)  # a.pt truncated, b.pt missing
    legacy_checkpoint(tmp_path, 80, good, {**sizes, "c.pt": 1})  # a file gone since
    (tmp_path / "step-x").mkdir()  # not a step
    assert committed_steps(str(tmp_path)) == [40, 5]


def config_of(run_dir: Path, data: Path, *overrides: str):
    settings = [f"run.dir={run_dir}", f"data.url={data}", "data.num_workers=0", "model.size=UNet-T"]
    settings += ["model.num_classes=5", "train.micro_batch_size=4", "train.global_batch_size=4", "train.zero_stage=2"]
    settings += ["train.precision=fp32", "diffusion.num_timesteps=50", "diffusion.sample_steps=10", "checkpoint.keep=2"]
    return load_config(None, [*settings, *overrides])


class Run:
    """The objects train() builds, stepped by hand."""

    def __init__(self, config) -> None:
        torch.manual_seed(0)
        self.objective = OBJECTIVES["unet"].from_config(config)
        self.data = LatentLoader(
            config.data.url, batch_size=4, null_label=5, seed=config.run.seed, draws=self.objective.draw
        )
        model = self.objective.build("UNet-T", 4, 5, learn_sigma=True)
        self.engine = Engine(model, config, 1, torch.device("cpu"))
        self.ema = EMA(self.engine.local_parameters, 0.9, partitioned=self.engine.partitioned)
        export = ExportInfo.from_config(config, self.data.manifest, self.data.latent_shape)
        self.state = TrainState(config, self.engine, self.ema, self.data, export, rank=0, world_size=1)
        self.batches = iter(self.data)

    def step(self) -> float:
        batch = next(self.batches)
        terms = self.objective.loss(self.engine, batch.latents, batch.labels, batch.draws)
        self.engine.backward(self.objective.total(terms))
        assert self.engine.step().applied
        self.ema.update()
        self.state.progress.step += 1
        return terms["loss"].mean().item()


@pytest.mark.usefixtures("single_rank_group")
def test_resume_restores_what_the_next_step_depends_on(tmp_path):
    write_dataset(str(tmp_path / "data"), [12, 12], shape=(4, 8, 8))
    config = config_of(tmp_path / "run", tmp_path / "data")
    first = Run(config)
    first.step(), first.step()
    first.state.resumed_tracking = {"run_id": "abc", "run_key": "k", "restarts": 0}
    assert first.state.save()
    random.random(), torch.rand(3)  # draws after the save must not leak into the resumed run
    continued = [first.step(), first.step()]
    weights = {k: v.clone() for k, v in first.engine.module.state_dict().items()}

    second = Run(config)
    assert second.state.resume()
    assert second.state.progress.step == 2 and second.state.resumed_tracking["run_id"] == "abc"
    assert [second.step(), second.step()] == continued  # the same batches, draws and weights
    assert all(torch.equal(weights[k], v) for k, v in second.engine.module.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(first.ema.shadow, second.ema.shadow, strict=True))

    other = config_of(tmp_path / "run", tmp_path / "data", "model.dropout=0.1")
    with pytest.raises(TrainingAborted, match="was made by another model"):
        Run(other).state.resume()


@pytest.mark.usefixtures("single_rank_group")
def test_checkpoints_hold_no_pickles(tmp_path):
    write_dataset(str(tmp_path / "data"), [12, 12], shape=(4, 8, 8))
    run = Run(config_of(tmp_path / "run", tmp_path / "data"))
    run.step()
    assert run.state.save() and committed_steps(str(tmp_path / "run" / "checkpoints")) == [1]
    (attempt,) = (tmp_path / "run" / "checkpoints" / "step-1").iterdir()
    assert sorted(p.name for p in attempt.iterdir()) == ["state.json", "tensors-00000.safetensors"]


class Payload:
    """Unpickling this runs code: what a tampered checkpoint could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.usefixtures("single_rank_group")
def test_a_format_1_checkpoint_with_a_pickle_payload_is_refused_unopened(tmp_path):
    directory = tmp_path / "step-2"
    directory.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "payload": Payload(marker)}, directory / "mp_rank_00_model_states.pt")
    config = load_config(None, ["model.size=UNet-T", "train.zero_stage=0", "train.precision=fp32"])
    engine = Engine(OBJECTIVES["unet"].build("UNet-T", 4, 5, learn_sigma=True), config, 1, torch.device("cpu"))
    with pytest.raises(UnsafeCheckpoint, match="mp_rank_00_model_states.pt holds objects beyond tensors"):
        engine.load_legacy(directory)
    assert not marker.exists()
