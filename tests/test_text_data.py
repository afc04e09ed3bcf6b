"""Captioned data (issue 18): TextEncoder on tiny T5 and CLIP encoders, captions through encode_latents
(folder + sidecar, img2dataset tars, local and S3), null_text.safetensors, and inspect_shards on text."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import encode_latents, inspect_shards
from data_tools.make_digits import write_digits
from data_tools.make_text_encoder import build_text_encoder
from diffusion_dist.codecs import PixelCodec
from diffusion_dist.data.manifest import DatasetError, load_manifest, load_null_text, manifest_bytes, validate_manifest
from diffusion_dist.data.shards import decode_npy, encode_npy, iter_tar_samples, tar_bytes
from diffusion_dist.pictures import BACKGROUND, grid_image
from diffusion_dist.text import TextEncoder, TextEncoderMismatch, bf16_bits, check_text_encoder, from_bf16_bits
from tests.conftest import ROOT

L = 16  # tokens per caption in these tests: short enough that some captions are truncated
LONG = "a very long caption that goes on and on about the digit"  # > 16 tokens for both tokenizers


@pytest.fixture(scope="session")
def t5(tmp_path_factory) -> Path:
    return build_text_encoder(tmp_path_factory.mktemp("t5"), "t5", seed=0)


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    return build_text_encoder(tmp_path_factory.mktemp("clip"), "clip", seed=0)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """40 labelled digit images with a sidecar: 2 captions for every 4th image, none for every 10th."""
    root = tmp_path_factory.mktemp("captioned")
    write_digits(root / "images", limit=40)
    files = sorted(str(p.relative_to(root / "images")) for p in (root / "images").rglob("*.png"))
    lines = []
    for i, file in enumerate(files):
        digit = file.split("/")[0]
        if i % 10 == 9:
            continue
        if i % 4 == 0:
            lines.append({"file": file, "captions": [f"digit {digit}", f"{LONG} {digit}"]})
        else:
            lines.append({"file": file, "caption": f"the digit {digit}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def encode(*args) -> int:
    return encode_latents.main([str(a) for a in args])


def samples_of(root: Path) -> list[dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [s for shard in manifest["shards"] for s in iter_tar_samples((root / shard["name"]).read_bytes())]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def folder_args(images: Path, encoder: Path, out: Path, *extra) -> list:
    return [
        "--input", images / "images", "--output", out, "--vae", "pixel", "--resolution", 8,
        "--captions", images / "captions.jsonl", "--text-encoder", encoder, "--text-max-length", L,
        "--shard-size", 12, "--batch-size", 5, "--num-workers", 0, *extra,
    ]  # fmt: skip


# TextEncoder


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_text_encoder_shapes_mask_pooled_and_truncation(kind, request):
    folder = request.getfixturevalue(kind)
    state = torch.get_rng_state()
    encoder = TextEncoder.load(folder, max_length=L)
    assert torch.equal(torch.get_rng_state(), state), "loading must not draw from the global RNG"
    texts = ["the digit 3", "", LONG]
    batch = encoder.encode(texts)
    assert batch.embedding.shape == (3, L, 64) and batch.embedding.dtype == torch.float32
    assert batch.mask.shape == (3, L) and batch.mask.dtype == torch.bool
    assert batch.truncated == 1
    lengths = [len(ids) for ids in encoder.tokenizer(texts)["input_ids"]]
    assert batch.mask.sum(1).tolist() == [min(n, L) for n in lengths]
    assert all(m[: int(m.sum())].all() for m in batch.mask)  # real tokens first, then padding
    again = encoder.encode(texts)
    assert torch.equal(again.embedding, batch.embedding) and torch.equal(again.mask, batch.mask)
    if kind == "t5":
        assert batch.pooled is None and encoder.record()["pooled_size"] is None
        # The padding mask is applied: real tokens do not depend on how much padding follows.
        longer = TextEncoder.load(folder, max_length=2 * L).encode(texts[:1])
        n = int(batch.mask[0].sum())
        torch.testing.assert_close(longer.embedding[0, :n], batch.embedding[0, :n], atol=1e-5, rtol=1e-5)
    else:
        assert batch.pooled.shape == (3, 32)
        # text_embeds: the projection of the final state at the end marker (Radford et al. 2021).
        eos = [int(m.sum()) - 1 for m in batch.mask]
        last = batch.embedding[torch.arange(3), eos]  # (3, D)
        torch.testing.assert_close(batch.pooled, encoder.model.text_projection(last), atol=1e-5, rtol=1e-5)


def test_default_max_length_and_limits(t5, clip):
    assert TextEncoder.load(t5).max_length == 77  # ByT5 names no maximum: capped at 77
    assert TextEncoder.load(clip).max_length == 77
    assert TextEncoder.load(t5, max_length=200).max_length == 200  # T5's relative positions allow it
    with pytest.raises(ValueError, match="exceeds the 77 positions"):
        TextEncoder.load(clip, max_length=78)
    with pytest.raises(ValueError, match="cannot load the text encoder"):
        TextEncoder.load(t5.parent / "nothing-here")


def test_an_encoder_without_its_tokenizer_is_refused(t5, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(t5 / name, tmp_path / name)
    with pytest.raises(ValueError, match="no tokenizer files"):
        TextEncoder.load(tmp_path)


def test_record_hash_follows_weights_and_vocabulary(t5, clip, tmp_path):
    record = TextEncoder.load(t5, max_length=L).record()
    assert record == {
        "name": str(t5),
        "class": "T5EncoderModel",
        "max_length": L,
        "hidden_size": 64,
        "pooled_size": None,
        "sha256": record["sha256"],
    }
    clip_record = TextEncoder.load(clip, max_length=L).record()
    assert (clip_record["class"], clip_record["pooled_size"]) == ("CLIPTextModelWithProjection", 32)
    # Seeded: rebuilt, the same encoder; copied elsewhere, still the same (the name is not compared).
    rebuilt = TextEncoder.load(build_text_encoder(tmp_path / "again", "t5", seed=0), max_length=L).record()
    assert rebuilt["sha256"] == record["sha256"]
    check_text_encoder(record, rebuilt)

    # One weight changed by one ulp.
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(t5, changed)
    weights = load_file(changed / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] = torch.nextafter(weights[name].view(-1)[0], torch.tensor(math.inf))
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    other = TextEncoder.load(changed, max_length=L).record()
    assert other["sha256"] != record["sha256"]
    with pytest.raises(TextEncoderMismatch) as error:
        check_text_encoder(record, other, "the dataset")
    assert str(t5) in str(error.value) and str(changed) in str(error.value) and "sha256" in str(error.value)

    # One token of the vocabulary renamed.
    vocabulary = tmp_path / "vocabulary"
    shutil.copytree(clip, vocabulary)
    vocab = json.loads((vocabulary / "vocab.json").read_text())
    vocab["zz"] = vocab.pop("a</w>")
    (vocabulary / "vocab.json").write_text(json.dumps(vocab))
    assert TextEncoder.load(vocabulary, max_length=L).record()["sha256"] != clip_record["sha256"]

    # A different max_length is a different encoding too; from_record loads and checks.
    with pytest.raises(TextEncoderMismatch, match="max_length"):
        check_text_encoder(record, TextEncoder.load(t5, max_length=L + 1).record())
    assert TextEncoder.from_record(record).max_length == L
    with pytest.raises(TextEncoderMismatch):
        TextEncoder.from_record(record, name_or_path=str(changed))


def test_bf16_bits_round_trip():
    x = torch.randn(3, 5, 7) * 100
    bits = bf16_bits(x)
    assert bits.dtype == np.uint16 and bits.shape == (3, 5, 7)
    assert torch.equal(from_bf16_bits(bits), bf16(x))


# encode_latents with captions


def test_folder_with_sidecar_captions(images, t5, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(*folder_args(images, t5, out)) == 0
    err = capsys.readouterr().err
    manifest = load_manifest(str(out))
    encoder = TextEncoder.load(t5, max_length=L)
    assert manifest["text"] == {
        "encoder": encoder.record(),
        "null": "null_text.safetensors",
        "captions": {"max_per_image": 2, "total": 46, "truncated": 10, "missing": {"policy": "skip", "count": 4}},
        # Prompts for in-training grids: the first 8 distinct first captions, in dataset order.
        "examples": list(dict.fromkeys(json.loads(s["captions.json"])[0] for s in samples_of(out)))[:8],
    }
    assert len(manifest["text"]["examples"]) == 8
    assert "captions: 46 encoded (at most 2 per image), 10 truncated to 16 tokens, 4 images without one" in err
    assert manifest["num_samples"] == 36
    assert sorted(s["reason"] for s in manifest["skipped"]) == ["no caption"] * 4
    sidecar = {}
    for line in (images / "captions.jsonl").read_text().splitlines():
        entry = json.loads(line)
        sidecar[entry["file"]] = entry.get("captions") or [entry["caption"]]
    for sample in samples_of(out):
        meta = json.loads(sample["json"])
        captions = json.loads(sample["captions.json"])
        assert captions == sidecar[meta["source"]] and meta["caption"] == captions[0]
        text = decode_npy(sample["text.npy"])
        mask = decode_npy(sample["text_mask.npy"])
        assert text.dtype == np.uint16 and text.shape == (len(captions), L, 64)
        assert mask.dtype == np.uint8 and mask.shape == (len(captions), L)
        assert "text_pooled.npy" not in sample  # T5 has no pooled vector
        expected = encoder.encode(captions)
        assert np.array_equal(mask, expected.mask.numpy().astype(np.uint8))
        # Encoded in a batch of other captions: equal up to bfloat16 rounding.
        torch.testing.assert_close(from_bf16_bits(text), expected.embedding, atol=0.02, rtol=0.01)

    null = load_null_text(str(out))
    expected = encoder.encode([""])
    assert set(null) == {"embedding", "mask"}
    assert torch.equal(null["embedding"], bf16(expected.embedding[0])) and torch.equal(null["mask"], expected.mask[0])


def test_missing_captions_empty_keeps_images_with_the_empty_caption(images, clip, tmp_path):
    out = tmp_path / "out"
    assert encode(*folder_args(images, clip, out, "--missing-captions", "empty")) == 0
    manifest = load_manifest(str(out))
    assert manifest["num_samples"] == 40 and manifest["skipped"] == []
    assert manifest["text"]["captions"]["missing"] == {"policy": "empty", "count": 4}
    assert manifest["text"]["encoder"]["pooled_size"] == 32
    null = load_null_text(str(out))
    assert null["pooled"].shape == (32,) and null["embedding"].shape == (L, 64)
    empty = [s for s in samples_of(out) if json.loads(s["captions.json"]) == [""]]
    assert len(empty) == 4
    for sample in empty:
        assert "caption" not in json.loads(sample["json"])  # the input had none
        torch.testing.assert_close(
            from_bf16_bits(decode_npy(sample["text.npy"]))[0], null["embedding"], atol=0.02, rtol=0.01
        )
        torch.testing.assert_close(
            from_bf16_bits(decode_npy(sample["text_pooled.npy"]))[0], null["pooled"], atol=0.02, rtol=0.01
        )
        assert np.array_equal(decode_npy(sample["text_mask.npy"])[0], null["mask"].numpy().astype(np.uint8))


def test_output_bytes_do_not_depend_on_workers_or_split(images, t5, tmp_path):
    assert encode(*folder_args(images, t5, tmp_path / "w0")) == 0
    assert encode(*folder_args(images, t5, tmp_path / "w2"), "--num-workers", 2) == 0
    split = tmp_path / "split"
    assert encode(*folder_args(images, t5, split), "--rank", 1, "--world-size", 2) == 0
    assert not (split / "manifest.json").exists() and not (split / "null_text.safetensors").exists()
    assert encode(*folder_args(images, t5, split), "--rank", 0, "--world-size", 2) == 0
    single = files(tmp_path / "w0")
    assert "null_text.safetensors" in single
    assert files(tmp_path / "w2") == single and files(split) == single


def test_interrupted_run_resumes_and_another_text_encoder_is_refused(images, t5, clip, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(*folder_args(images, t5, out)) == 0
    finished = files(out)
    # As if killed before finalizing, with unit 2's shard lost: the rerun encodes only that unit.
    for name in ("manifest.json", "null_text.safetensors", "000002-000.tar"):
        (out / name).unlink()
    capsys.readouterr()
    assert encode(*folder_args(images, t5, out)) == 0
    assert "3 units were already done" in capsys.readouterr().err
    assert files(out) == finished
    assert encode(*folder_args(images, clip, out)) == 2
    err = capsys.readouterr().err
    assert "already holds latents encoded with other settings" in err and "text.encoder" in err
    # Without captions, the same output is other settings too; with --overwrite the text goes.
    plain = ["--input", images / "images", "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 12]
    assert encode(*plain) == 2
    assert encode(*plain, "--overwrite") == 0
    assert "text" not in load_manifest(str(out)) and not (out / "null_text.safetensors").exists()


def img2dataset_tar(items: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of samples as img2dataset writes them: <key>.png beside <key>.txt / <key>.json."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in items:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def captioned_tars() -> dict[str, bytes]:
    """Two tars: captions in .txt, in .json "caption", in .json "captions", and one image with none."""
    rng = np.random.default_rng(0)

    def png() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(out, "PNG")
        return out.getvalue()

    first = [
        ("a", {"png": png(), "txt": b"a red square\n"}),
        ("b", {"png": png(), "json": json.dumps({"url": "https://example.invalid/b", "caption": "blue"}).encode()}),
        ("c", {"png": png(), "json": json.dumps({"captions": ["one", "two", "three"]}).encode(), "txt": b"ignored"}),
    ]
    second = [
        ("d", {"png": png(), "json": json.dumps({"url": "https://example.invalid/d"}).encode()}),  # no caption
        ("e", {"png": png(), "txt": LONG.encode()}),
    ]
    return {"00000.tar": img2dataset_tar(first), "00001.tar": img2dataset_tar(second)}


EXPECTED_TAR_CAPTIONS = {
    "00000/a": ["a red square"],
    "00000/b": ["blue"],
    "00000/c": ["one", "two", "three"],
    "00001/e": [LONG],
}


def test_img2dataset_tars_with_txt_and_json_captions(clip, tmp_path):
    for name, data in captioned_tars().items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    args = ["--input", tmp_path / "{00000..00001}.tar", "--output", out, "--vae", "pixel", "--resolution", 8]
    assert encode(*args, "--text-encoder", clip, "--text-max-length", L, "--num-workers", 1) == 0
    manifest = load_manifest(str(out))
    assert manifest["skipped"] == [{"source": "00001/d", "reason": "no caption"}]
    assert manifest["text"]["captions"] == {
        "max_per_image": 3,
        "total": 6,
        "truncated": 1,
        "missing": {"policy": "skip", "count": 1},
    }
    samples = samples_of(out)
    assert {s["__key__"]: json.loads(s["captions.json"]) for s in samples} == EXPECTED_TAR_CAPTIONS
    c = next(s for s in samples if s["__key__"] == "00000/c")
    assert decode_npy(c["text.npy"]).shape == (3, L, 64) and decode_npy(c["text_pooled.npy"]).shape == (3, 32)
    assert inspect_shards.main([str(out)]) == 0


def test_captions_on_s3(images, t5, s3, tmp_path):
    """Tars and a sidecar on S3 as input, the dataset on S3 as output; read back through the same URLs."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    for name, data in captioned_tars().items():
        fs.pipe_file(f"{s3.bucket}/tars/{name}", data)
    options = json.dumps(s3.storage_options)
    url = s3.url("latents", "tars")
    args = ["--input", s3.url("tars", "{00000..00001}.tar"), "--output", url, "--vae", "pixel", "--resolution", 8]
    assert encode(*args, "--text-encoder", t5, "--num-workers", 2, "--storage-options", options) == 0
    manifest = load_manifest(url, s3.storage_options)
    assert manifest["text"]["encoder"]["max_length"] == 77 and manifest["num_samples"] == 4
    null = load_null_text(url, s3.storage_options)
    assert torch.equal(null["embedding"], bf16(TextEncoder.load(t5).encode([""]).embedding[0]))
    assert inspect_shards.main([url, "--storage-options", options]) == 0

    # A folder's sidecar on S3 (read with the input's options), written to S3: the local run's shards.
    fs.put_file(str(images / "captions.jsonl"), f"{s3.bucket}/captions.jsonl")
    local = tmp_path / "local"
    assert encode(*folder_args(images, t5, local)) == 0
    remote = folder_args(images, t5, s3.url("latents", "folder"), "--storage-options", options)
    remote[remote.index("--captions") + 1] = s3.url("captions.jsonl")
    assert encode(*remote) == 0
    written = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(f"{s3.bucket}/latents/folder", maxdepth=1)}
    expected = {k: v for k, v in files(local).items() if "/" not in k and k != "manifest.json"}
    assert {k: v for k, v in written.items() if k != "manifest.json"} == expected
    assert json.loads(written["manifest.json"])["tool"]["args"]["captions"] == s3.url("captions.jsonl")


@pytest.mark.slow
def test_offline_subprocess_with_a_local_encoder(images, clip, tmp_path):
    """HF_HUB_OFFLINE=1: a local encoder folder is all that is needed; the summary names the captions."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_tools.encode_latents", *map(str, folder_args(images, clip, out))]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "captions: 46 encoded" in result.stderr
    inspected = subprocess.run(
        [sys.executable, "-m", "data_tools.inspect_shards", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert inspected.returncode == 0 and "text: CLIPTextModelWithProjection" in inspected.stdout, inspected.stdout


# Bad caption inputs: refused before any work, naming the file and line.


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"file": "0/00000.png", "caption": "x"}', "", '{"file": "0/00010.png", "caption": "y"'],
            "line 3: not valid JSON",
        ),
        (
            ['{"file": "0/00000.png", "caption": "x"}', '{"file": "0/nope.png", "caption": "y"}'],
            "line 2: '0/nope.png' is not an image",
        ),
        (['{"caption": "x"}'], 'line 1: expected a JSON object with a "file" string'),
        (['{"file": "0/00000.png", "caption": "x", "captions": ["y"]}'], "line 1: give exactly one of"),
        (['{"file": "0/00000.png", "captions": []}'], 'line 1: "caption" must be a string'),
        (['["0/00000.png", "x"]'], "line 1: expected a JSON object"),
    ],
)
def test_bad_captions_file_is_refused_with_its_line(images, t5, tmp_path, capsys, lines, message):
    sidecar = tmp_path / "bad.jsonl"
    sidecar.write_text("\n".join(lines) + "\n")
    args = folder_args(images, t5, tmp_path / "out")
    args[args.index("--captions") + 1] = sidecar
    assert encode(*args) == 2
    err = capsys.readouterr().err
    assert f"--captions {sidecar} {message}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a, p: a[: a.index("--text-encoder")] + a[a.index("--text-max-length") :],
            "--captions needs --text-encoder",
        ),
        (
            lambda a, p: [p / "no-encoder" if x == a[a.index("--text-encoder") + 1] else x for x in a],
            "cannot load the text encoder",
        ),
        (
            lambda a, p: [p / "none.jsonl" if str(x).endswith("captions.jsonl") else x for x in a],
            "none.jsonl: no such file",
        ),
        (lambda a, p: [*a, "--text-max-length", 1], "must be >= 2"),
        (  # a folder's captions come only from --captions: without it every image would be captionless
            lambda a, p: a[: a.index("--captions")] + a[a.index("--captions") + 2 :],
            "needs --captions FILE: one JSON line per image",
        ),
    ],
)
def test_bad_text_arguments_are_refused(images, t5, tmp_path, capsys, change, message):
    assert encode(*change(folder_args(images, t5, tmp_path / "out"), tmp_path)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_captions_file_for_tar_input_is_refused(t5, tmp_path, capsys):
    (tmp_path / "00000.tar").write_bytes(captioned_tars()["00000.tar"])
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "x"}\n')
    args = ["--input", tmp_path / "00000.tar", "--output", tmp_path / "out", "--vae", "pixel"]
    assert encode(*args, "--captions", tmp_path / "c.jsonl", "--text-encoder", t5) == 2
    assert "--captions applies to image folders" in capsys.readouterr().err


# The manifest's text record and inspect_shards.


def test_text_record_is_validated(images, t5, tmp_path):
    out = tmp_path / "out"
    assert encode(*folder_args(images, t5, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for path, value in [
        (("encoder", "sha256"), None),
        (("encoder", "max_length"), 0),
        (("captions", "missing", "policy"), "drop"),
        (("null",), 3),
    ]:
        broken = json.loads(json.dumps(manifest))
        target = broken["text"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(DatasetError, match=r"text\." + path[0]):
            validate_manifest(broken, "here")
    del manifest["text"]
    validate_manifest(manifest, "here")  # a dataset without text stays valid


def test_inspect_checks_text_members_and_labels_grid_rows_with_captions(images, t5, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(*folder_args(images, t5, out)) == 0
    grid = tmp_path / "grid.png"
    assert inspect_shards.main([str(out), "--grid", str(grid), "--n", "9"]) == 0
    assert "text: T5EncoderModel" in capsys.readouterr().out

    # Oracle: rows are the first 3 first-captions met, each with its first 3 samples, labelled with it.
    rows: dict[str, list[dict]] = {}
    for sample in samples_of(out):
        caption = json.loads(sample["captions.json"])[0]
        if caption not in rows and len(rows) < 3:
            rows[caption] = []
        if caption in rows and len(rows[caption]) < 3:
            rows[caption].append(sample)
    columns = max(map(len, rows.values()))
    cells = np.full((len(rows) * columns, 8, 8, 3), BACKGROUND, dtype=np.uint8)
    for r, row in enumerate(rows.values()):
        for c, sample in enumerate(row):
            latent = torch.from_numpy(decode_npy(sample["latent.npy"]))[None]
            cells[r * columns + c] = PixelCodec().decode(latent)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(grid)), grid_image(cells, len(rows), list(rows)))

    # A text.npy of the wrong shape, a NaN in another, and a missing null file are each reported.
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][0]
    samples = [
        {k: bytes(v) if k != "__key__" else v for k, v in s.items()}
        for s in iter_tar_samples((out / entry["name"]).read_bytes())
    ]
    samples[0]["text.npy"] = encode_npy(decode_npy(samples[0]["text.npy"])[:, :-1])
    poisoned = decode_npy(samples[1]["text.npy"]).copy()
    poisoned[0, 0, 0] = bf16_bits(torch.tensor(math.nan))
    samples[1]["text.npy"] = encode_npy(poisoned)
    data = tar_bytes(samples)
    import hashlib

    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / entry["name"]).write_bytes(data)
    (out / "manifest.json").write_bytes(manifest_bytes(manifest))
    (out / "null_text.safetensors").unlink()
    assert inspect_shards.main([str(out)]) == 1
    report = capsys.readouterr().out
    k = len(json.loads(samples[0]["captions.json"]))
    assert f"{samples[0]['__key__']}: text.npy is uint16[{k}, {L - 1}, 64], {k} captions" in report
    assert f"{samples[1]['__key__']}: text.npy holds NaN or inf" in report
    assert "MISMATCH null_text.safetensors: " in report and "is missing" in report
    assert "1 of 4 shards have problems; so has null_text.safetensors" in report
