"""The text path end to end on CPU (issue 18): digits captioned in five phrasings, encoded with a tiny
CLIP text encoder into shards on S3 (moto), streamed to a 2-rank ZeRO-2 run of a UNet conditioned on
class and text with its checkpoints on S3, killed and resumed bit-identically, exported, and sampled
from prompts, prompts with classes and classes alone with the recorded null text; a different text
encoder is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from data_tools import encode_latents
from data_tools.make_digits import write_captions, write_digits
from data_tools.make_text_encoder import build_text_encoder
from tests.conftest import ROOT
from tests.test_train import (
    assert_same_tensors,
    consumed_keys,
    kill_tree,
    metrics,
    overrides,
    start,
    train,
    wait_for_step,
)

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.fixture
def captioned(s3, tmp_path) -> tuple[str, Path]:
    """The digits with captions, encoded by a tiny CLIP text encoder (it pools) into shards on S3."""
    images, encoder = tmp_path / "images", tmp_path / "encoder"
    write_digits(images)
    write_captions(images, tmp_path / "captions.jsonl")
    build_text_encoder(encoder, kind="clip", seed=0)
    url = s3.url("digits")
    arguments = ["--input", str(images), "--output", url, "--vae", "pixel", "--resolution", "8"]
    arguments += ["--shard-size", "150", "--num-workers", "1", "--storage-options", json.dumps(s3.storage_options)]
    arguments += ["--captions", str(tmp_path / "captions.jsonl"), "--text-encoder", str(encoder)]
    arguments += ["--text-max-length", "16"]
    assert encode_latents.main(arguments) == 0
    return url, encoder


def sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.sample", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_text_model_resumes_bit_identically_and_samples_from_prompts(s3, captioned, tmp_path):
    url, encoder = captioned
    endpoint = s3.storage_options["client_kwargs"]["endpoint_url"]
    # The s3 fixture's credentials (canaries; moto takes any) reach the ranks through the environment.
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}

    def args(name: str) -> list[str]:
        return overrides(
            tmp_path / name,
            url,
            model__text="true",
            model__num_classes=10,  # class and text together: both dropped to ∅ together
            model__dropout=0.1,
            train__max_steps=30,
            checkpoint__every=15,
            checkpoint__dir=s3.url("runs", name),
            data__storage_options__client_kwargs__endpoint_url=endpoint,
            checkpoint__storage_options__client_kwargs__endpoint_url=endpoint,
        )

    whole = train(args("whole"), env=env)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    killed = tmp_path / "killed"
    process = start(args("killed"), env=env)
    reached = wait_for_step(killed, 17, process, timeout=600)
    kill_tree(process)
    assert 17 <= reached < 30
    restarted = train(args("killed"), env=env)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert "resumed from step-15 at step 15" in restarted.stdout + restarted.stderr

    expected, got = metrics(tmp_path / "whole"), metrics(killed)
    assert sorted(got) == list(range(1, 31))
    assert [got[s]["loss"] for s in range(1, 31)] == [expected[s]["loss"] for s in range(1, 31)]
    for name in ("ema.safetensors", "model.safetensors", "null_text.safetensors"):
        assert_same_tensors(load_file(killed / "export" / name), load_file(tmp_path / "whole" / "export" / name))
    for rank in range(2):
        assert consumed_keys(killed, rank) == consumed_keys(tmp_path / "whole", rank)

    # launch.export rebuilds the same export from the last checkpoint alone (on S3), null text included.
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.export",
            killed,
            "--checkpoint",
            s3.url("runs", "killed", "step-30"),
            "--out",
            tmp_path / "exported",
            "--storage-options",
            json.dumps(s3.storage_options),
        ],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    for name in ("ema.safetensors", "null_text.safetensors"):
        assert_same_tensors(load_file(tmp_path / "exported" / name), load_file(killed / "export" / name))

    # The export names the encoder the data was made with and holds the dataset's null text.
    info = json.loads((killed / "export" / "config.json").read_text())
    assert info["text_encoder"]["max_length"] == 16 and info["text_encoder"]["pooled_size"] == 32
    null = load_file(killed / "export" / "null_text.safetensors")
    assert null["embedding"].shape == (16, 64) and null["pooled"].shape == (32,)

    # Sampling from prompts: encoded by the recorded encoder (a local copy is the same encoder), the
    # same seed gives the same images.
    prompts = ["the digit 3", "a handwritten seven"]
    common = [killed / "export", "--prompt", prompts[0], "--prompt", prompts[1], "--per-class", 2, "--steps", 5]
    first = sample(*common, "--text-encoder", encoder, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    copy = tmp_path / "encoder-copy"
    shutil.copytree(encoder, copy)
    second = sample(*common, "--text-encoder", copy, "--out", tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (4, 8, 8, 3) and list(a["prompts"]) == [p for p in prompts for _ in range(2)]
    assert np.array_equal(a["images"], b["images"])
    assert (tmp_path / "a.png").exists()

    # Another encoder (other weights) is refused before any sampling, naming both.
    other = tmp_path / "other-encoder"
    build_text_encoder(other, kind="clip", seed=1)
    refused = sample(*common, "--text-encoder", other, "--out", tmp_path / "c")
    assert refused.returncode == 2
    assert f"the text encoder {str(other)!r}" in refused.stderr and "differs from" in refused.stderr
    assert "sha256" in refused.stderr and not (tmp_path / "c.npz").exists()
    # Class and text were each dropped alone too: a prompt with a class, or a class with the null text.
    export, short = killed / "export", ["--per-class", 2, "--steps", 5, "--text-encoder", encoder]
    paired = sample(export, *common[1:5], "--classes", "3,7", *short, "--out", tmp_path / "paired")
    assert paired.returncode == 0, paired.stderr[-3000:]
    assert list(np.load(tmp_path / "paired.npz")["labels"]) == [3, 3, 7, 7]
    classes = sample(export, "--classes", "1,2", *short, "--out", tmp_path / "classes")
    assert classes.returncode == 0, classes.stderr[-3000:]
    assert "prompts" not in np.load(tmp_path / "classes.npz")
    uneven = sample(export, *common[1:5], "--classes", "3", *short, "--out", tmp_path / "uneven")
    assert uneven.returncode == 2 and "give one class per prompt" in uneven.stderr
    assert "give --prompt or --prompts-file" in sample(export, "--out", tmp_path / "d").stderr


def test_a_text_model_on_data_without_captions_is_refused_before_training(digits_latents, tmp_path):
    result = train(overrides(tmp_path / "run", digits_latents, model__text="true"), ranks=0)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "has no text embeddings" in result.stderr and "re-encode this one with a text encoder" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
