"""Runs made by earlier versions still load: a checkpoint and an export written by the code at 9b68806.

tests/fixtures/run-9b68806.tar.xz holds run.dir of `python -m launch.train configs/demo.yaml` at that
commit: 1 rank, ZeRO-2, fp32, UNet-T on the digits latents of tests/conftest.py (pixel codec, 8×8,
shards of 150), global and micro batch 8, 2 steps with checkpoint.every=1: config.yaml,
checkpoints/step-2/ (DeepSpeed's files, shared.pt, rank-00000.pt, COMMITTED.json) and export/
(ema.safetensors, config.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_dist.export import load_export
from tests.conftest import ROOT
from tests.test_train import ENV, metrics, train

FIXTURE = ROOT / "tests" / "fixtures" / "run-9b68806.tar.xz"


@pytest.fixture
def old_run(tmp_path) -> Path:
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path / "run", filter="data")
    return tmp_path / "run"


def test_an_old_export_loads_and_samples(old_run, tmp_path):
    model, diffusion, info = load_export(old_run)
    assert info.model.kind == "unet" and info.model.num_classes == 10 and info.latent_shape == (3, 8, 8)
    assert diffusion.num_timesteps == 1000 and info.step == 2
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 10]))
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()
    sample = subprocess.run(
        [sys.executable, "-m", "launch.sample", str(old_run), "--classes", "3", "--per-class", "2"]
        + ["--steps", "5", "--out", str(tmp_path / "grid")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr
    assert np.load(tmp_path / "grid.npz")["images"].shape == (2, 8, 8, 3)


@pytest.mark.slow
def test_an_old_checkpoint_resumes_and_exports(old_run, digits_latents, tmp_path):
    args = [
        f"run.dir={old_run}",
        f"data.url={digits_latents}",
        "data.num_workers=0",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "train.max_steps=4",
        "tracking.enabled=false",
        "tracking.sample_every=0",
        "tracking.log_every=1",
    ]
    resumed = train(args, ranks=1)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "step-2 at step 2" in resumed.stderr
    assert sorted(metrics(old_run)) == [3, 4] and all(np.isfinite(r["loss"]) for r in metrics(old_run).values())
    assert json.loads((old_run / "export" / "config.json").read_text())["step"] == 4

    exported = subprocess.run(
        [sys.executable, "-m", "launch.export", str(old_run), "--checkpoint", str(old_run / "checkpoints" / "step-2")]
        + ["--out", str(tmp_path / "export")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    _, _, info = load_export(tmp_path / "export")
    assert info.step == 2


@pytest.mark.slow
def test_an_old_checkpoint_with_a_pickle_payload_is_refused(old_run, digits_latents, tmp_path):
    """A DeepSpeed file whose pickle would run code: refused before DeepSpeed unpickles it (a size
    that matches the commit marker does not help)."""
    from tests.test_checkpoint import Payload

    directory = old_run / "checkpoints" / "step-2"
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "payload": Payload(marker)}, directory / "mp_rank_00_model_states.pt")
    commit = json.loads((directory / "COMMITTED.json").read_text())
    commit["files"]["mp_rank_00_model_states.pt"] = (directory / "mp_rank_00_model_states.pt").stat().st_size
    (directory / "COMMITTED.json").write_text(json.dumps(commit))
    args = [f"run.dir={old_run}", f"data.url={digits_latents}", "data.num_workers=0", "train.global_batch_size=8"]
    args += ["train.micro_batch_size=8", "train.max_steps=4", "tracking.enabled=false", "tracking.sample_every=0"]
    refused = train(args, ranks=1)
    assert refused.returncode == 1 and "holds objects beyond tensors and plain data" in refused.stderr, refused.stderr
    assert not marker.exists()
