"""data_tools.encode_latents and inspect_shards on a local folder and on S3 (moto server on loopback)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import encode_latents, inspect_shards
from data_tools.make_digits import write_digits
from diffusion_dist.codecs import PixelCodec
from diffusion_dist.data.shards import decode_npy, iter_tar_samples
from diffusion_dist.pictures import grid_layout, row_labels
from tests.conftest import CANARY_KEY_ID, CANARY_SECRET, ROOT
from tests.test_pictures import cells


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits(out, limit=300)
    return out


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A small AutoencoderKL built from a config and saved like a hub checkpoint (downsampling 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_loading_a_vae_leaves_the_global_rng_alone(tiny_vae):
    """Grids and FID load the VAE mid-training: its random initialisation must not shift the run's draws."""
    from diffusion_dist.codecs import AutoencoderKLCodec

    torch.manual_seed(123)
    state = torch.get_rng_state()
    AutoencoderKLCodec(str(tiny_vae))
    assert torch.equal(torch.get_rng_state(), state)


def encode(*args: str) -> int:
    return encode_latents.main([str(a) for a in args])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def all_samples(root: Path) -> list[dict]:
    return [s for shard in manifest(root)["shards"] for s in iter_tar_samples((root / shard["name"]).read_bytes())]


def test_pixel_codec_is_exactly_lossless(digits, tmp_path):
    out = tmp_path / "out"
    assert (
        encode(
            "--input",
            digits,
            "--output",
            out,
            "--vae",
            "pixel",
            "--resolution",
            8,
            "--flip",
            "--shard-size",
            64,
            "--num-workers",
            0,
        )
        == 0
    )
    m = manifest(out)
    assert m["num_samples"] == 300 and m["latent"] == {
        "shape": [3, 8, 8],
        "dtype": "float16",
        "layout": "sample",
        "moments": False,
        "flip": True,
    }
    assert m["labels"] == {"labelled": True, "num_classes": 10, "class_names": [str(i) for i in range(10)]}
    assert [s["samples"] for s in m["shards"]] == [64, 64, 64, 64, 44]
    codec = PixelCodec()
    for sample in all_samples(out):
        source = np.asarray(Image.open(digits / f"{sample['__key__']}.png").convert("RGB"))
        latent = torch.from_numpy(decode_npy(sample["latent.npy"]))[None]
        decoded = codec.decode(latent)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(decoded, source)
        assert np.array_equal(decode_npy(sample["latent_flip.npy"]), decode_npy(sample["latent.npy"])[..., ::-1])
        assert int(sample["cls"]) == int(sample["__key__"].split("/")[0])
        assert json.loads(sample["json"]) == {"source": sample["__key__"] + ".png", "width": 8, "height": 8}


def test_output_bytes_do_not_depend_on_worker_count(digits, tiny_vae, tmp_path):
    for workers in (0, 2):
        assert (
            encode(
                "--input",
                digits,
                "--output",
                tmp_path / f"w{workers}",
                "--vae",
                tiny_vae,
                "--resolution",
                16,
                "--shard-size",
                50,
                "--batch-size",
                16,
                "--num-workers",
                workers,
            )
            == 0
        )
    assert files(tmp_path / "w0") == files(tmp_path / "w2")


def test_split_run_writes_the_single_run_manifest(digits, tiny_vae, tmp_path, capsys):
    # A real VAE, so that any difference in batch composition between the runs would show in the bytes.
    common = [
        "--input",
        digits,
        "--vae",
        tiny_vae,
        "--resolution",
        16,
        "--shard-size",
        40,
        "--batch-size",
        16,
        "--num-workers",
        1,
    ]
    assert encode(*common, "--output", tmp_path / "single") == 0
    split = tmp_path / "split"
    assert encode(*common, "--output", split, "--rank", 1, "--world-size", 2) == 0
    assert not (split / "manifest.json").exists()
    assert "manifest not written yet" in capsys.readouterr().err
    assert encode(*common, "--output", split, "--finalize") == 2
    assert "units are not encoded yet" in capsys.readouterr().err

    assert encode(*common, "--output", split, "--rank", 0, "--world-size", 2) == 0  # the last part finalizes
    single, parts = files(tmp_path / "single"), files(split)
    assert parts == single
    (split / "manifest.json").unlink()
    assert encode(*common, "--output", split, "--finalize") == 0
    assert (split / "manifest.json").read_bytes() == single["manifest.json"]


def test_slurm_array_variables_pick_the_part(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    args = encode_latents.parse_args(["--input", "x", "--output", "y", "--vae", "pixel"])
    assert encode_latents.part_from_env(args) == (1, 2)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tiny_vae, tmp_path):
    images = tmp_path / "images"
    write_digits(images)
    command = [
        sys.executable,
        "-m",
        "data_tools.encode_latents",
        "--input",
        str(images),
        "--vae",
        str(tiny_vae),
        "--resolution",
        "32",
        "--shard-size",
        "100",
        "--batch-size",
        "10",
        "--num-workers",
        "1",
    ]
    assert (
        subprocess.run([*command, "--output", str(tmp_path / "whole")], cwd=ROOT, capture_output=True).returncode == 0
    )

    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(killed)], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "_parts").glob("unit-*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((killed / "_parts").glob("unit-*.json")))
    assert 3 <= done < 18, "the run should have been killed part way through its 18 units"
    assert not (killed / "manifest.json").exists()
    # Every shard under a final name is complete: a kill leaves at most a hidden .partial file.
    whole = files(tmp_path / "whole")
    for shard in killed.glob("*.tar"):
        assert shard.read_bytes() == whole[shard.name]

    rerun = subprocess.run([*command, "--output", str(killed)], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already done" in rerun.stderr
    resumed = {k: v for k, v in files(killed).items() if not k.split("/")[-1].startswith(".")}
    assert resumed == whole


def write_odd_images(folder: Path) -> None:
    """Images in every mode the tool must convert, and inputs it must skip."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "b_gray.png")
    rgba = np.dstack([rgb, np.where(np.arange(10) < 5, 0, 255).astype(np.uint8)[None].repeat(12, 0)])
    Image.fromarray(rgba, "RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "d_cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "e_palette.png")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(folder / "f_deep.png")  # 16-bit: 128 in 8 bits
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(folder / "f_deep_dark.png")  # 16-bit: 1 in 8 bits
    (folder / "g_empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(rgb).resize((64, 64)).save(buffer, "JPEG")
    (folder / "h_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "i_text.png").write_bytes(b"this is not an image")
    (folder / "notes.txt").write_text("not an image extension: ignored")


def test_odd_images_are_converted_and_bad_ones_skipped(tmp_path, capsys):
    write_odd_images(tmp_path / "odd")
    out = tmp_path / "out"
    assert (
        encode("--input", tmp_path / "odd", "--output", out, "--vae", "pixel", "--resolution", 8, "--num-workers", 2)
        == 0
    )
    m = manifest(out)
    assert m["num_samples"] == 7 and m["labels"] == {"labelled": False, "num_classes": 0, "class_names": None}
    assert sorted((s["source"], s["reason"]) for s in m["skipped"]) == [
        ("g_empty.jpg", "empty file"),
        ("h_truncated.jpg", "truncated"),
        ("i_text.png", "not a readable image"),
    ]
    samples = {s["__key__"]: s for s in all_samples(out)}
    assert all("cls" not in s for s in samples.values())
    deep = PixelCodec().decode(torch.from_numpy(decode_npy(samples["f_deep"]["latent.npy"]))[None])
    assert (deep == 128).all()  # scaled from 16 bits, not clipped to 255
    dark = PixelCodec().decode(torch.from_numpy(decode_npy(samples["f_deep_dark"]["latent.npy"]))[None])
    assert (dark == 1).all()  # the scale follows the bit depth, not the pixel values
    rgba = PixelCodec().decode(torch.from_numpy(decode_npy(samples["c_rgba"]["latent.npy"]))[None])[0]
    assert (rgba[:, :, :2] == 255).all()  # transparent columns composite onto white
    assert "skipped 3 (1 empty file, 1 truncated, 1 not a readable image)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "no images"),
        (lambda p: (p.mkdir(), (p / "readme.txt").write_text("x")), "no images"),
    ],
)
def test_missing_or_empty_input_fails_before_writing(tmp_path, capsys, setup, message):
    setup(tmp_path / "in")
    out = tmp_path / "out"
    assert encode("--input", tmp_path / "in", "--output", out, "--vae", "pixel", "--resolution", 8) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_mixed_folder_layout_is_refused(tmp_path, capsys):
    write_digits(tmp_path / "in", limit=20)
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "stray.png")
    assert encode("--input", tmp_path / "in", "--output", tmp_path / "out", "--vae", "pixel") == 2
    assert "both at the top level and in subfolders" in capsys.readouterr().err


def test_output_with_other_settings_is_refused_unless_overwrite(digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8) == 0
    before = files(out)
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 16) == 2
    err = capsys.readouterr().err
    assert "already holds latents encoded with other settings" in err and "resolution: 8 there, 16 now" in err
    assert files(out) == before
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 16, "--overwrite") == 0
    assert manifest(out)["resolution"] == 16 and manifest(out)["latent"]["shape"] == [3, 16, 16]


def test_a_rerun_of_a_finished_dataset_does_nothing(digits, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 100]
    assert encode(*args) == 0
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert encode(*args) == 0
    assert "3 units were already done" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before


def test_vae_moments_and_decoded_grid(digits, tiny_vae, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "out"
    assert (
        encode("--input", digits, "--output", out, "--vae", tiny_vae, "--resolution", 16, "--flip", "--num-workers", 1)
        == 0
    )
    m = manifest(out)
    assert m["codec"] == {
        "name": "autoencoder_kl",
        "model": str(tiny_vae),
        "subfolder": None,
        "scaling_factor": 0.5,
        "shift_factor": 0.1,
        "latent_channels": 4,
        "downsample": 2,
    }
    assert m["latent"]["shape"] == [8, 8, 8] and m["latent"]["layout"] == "moments"

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    first = all_samples(out)[:16]
    images = torch.stack(
        [
            torch.from_numpy(
                np.array(Image.open(digits / f"{s['__key__']}.png").convert("RGB").resize((16, 16), Image.BICUBIC))
            ).permute(2, 0, 1)
            for s in first
        ]
    )
    with torch.no_grad():
        posterior = vae.encode(images.float() / 127.5 - 1).latent_dist
    stored = torch.from_numpy(np.stack([decode_npy(s["latent.npy"]) for s in first])).float()
    torch.testing.assert_close(stored[:, :4], posterior.mean, atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(stored[:, 4:], posterior.logvar, atol=2e-2, rtol=2e-3)

    # The grid: a labelled row per class, the first 4 classes met with their first 4 samples each.
    grid = tmp_path / "grid.png"
    assert inspect_shards.main([str(out), "--grid", str(grid), "--n", "16"]) == 0
    decoded = np.asarray(Image.open(grid))
    by_class: dict[int, list[dict]] = {}
    for s in all_samples(out):
        by_class.setdefault(int(s["cls"]), []).append(s)
    shown = [s for c in sorted(list(by_class)[:4]) for s in by_class[c][:4]]
    layout = grid_layout(16, 16, 16, rows=4, labels=row_labels(sorted(list(by_class)[:4])))
    assert decoded.shape == (*layout.shape, 3) and layout.factor == 4  # 16 px samples in 64 px cells
    latents = torch.from_numpy(np.stack([decode_npy(s["latent.npy"]) for s in shown])).float()[:, :4]
    with torch.no_grad():
        expected = ((vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert np.abs(cells(decoded, layout, 16).astype(int) - expected.permute(0, 2, 3, 1).numpy()).max() <= 1


def test_unloadable_vae_is_a_clear_error(digits, tmp_path, capsys):
    assert encode("--input", digits, "--output", tmp_path / "out", "--vae", tmp_path / "no-vae") == 2
    assert "cannot load the VAE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_finds_a_corrupted_shard(digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 100) == 0
    assert inspect_shards.main([str(out)]) == 0
    shard = out / manifest(out)["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert inspect_shards.main([str(out)]) == 1
    assert f"MISMATCH {shard.name}: sha256 differs" in capsys.readouterr().out


def test_inspect_finds_non_finite_latents_and_wrong_counts(digits, tmp_path, capsys):
    from diffusion_dist.data.manifest import manifest_bytes
    from diffusion_dist.data.shards import encode_npy, tar_bytes

    out = tmp_path / "out"
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 100) == 0
    m = manifest(out)
    samples = [
        {k: bytes(v) if not isinstance(v, str) else v for k, v in s.items()}
        for s in iter_tar_samples((out / m["shards"][0]["name"]).read_bytes())
    ]
    poisoned = decode_npy(samples[3]["latent.npy"]).copy()
    poisoned[0, 0, 0] = np.nan
    samples[3]["latent.npy"] = encode_npy(poisoned)
    data = tar_bytes(samples[:-1])  # one sample short, too
    import hashlib

    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / m["shards"][0]["name"]).write_bytes(data)
    (out / "manifest.json").write_bytes(manifest_bytes(m))
    capsys.readouterr()
    assert inspect_shards.main([str(out)]) == 1
    report = capsys.readouterr().out
    assert "99 samples, the manifest says 100" in report and "latent.npy holds NaN or inf" in report


def test_storage_options_typos_do_not_echo_secrets(capsys):
    with pytest.raises(SystemExit):
        encode_latents.parse_args(
            [
                "--input",
                "x",
                "--output",
                "y",
                "--vae",
                "pixel",
                "--storage-options",
                f'{{"secret": "{CANARY_SECRET}",}}',
            ]
        )
    err = capsys.readouterr().err
    assert "not valid JSON" in err and CANARY_SECRET not in err


def test_a_killed_run_with_other_settings_is_still_refused(digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 100) == 0
    (out / "manifest.json").unlink()  # as if killed before finalizing, with unit 0's record lost too
    (out / "_parts" / "unit-000000.json").unlink()
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 16, "--shard-size", 100) == 2
    assert "resolution: 8 there, 16 now" in capsys.readouterr().err


def test_overwrite_removes_what_the_new_settings_no_longer_write(digits, tmp_path):
    out = tmp_path / "out"
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 50) == 0
    assert (
        encode(
            "--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8, "--shard-size", 150, "--overwrite"
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000-000.tar", "000001-000.tar"]
    assert sorted(p.name for p in (out / "_parts").iterdir()) == ["unit-000000.json", "unit-000001.json"]
    assert inspect_shards.main([str(out)]) == 0


def test_input_spellings_of_one_folder_agree(digits, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert encode("--input", digits, "--output", out, "--vae", "pixel", "--resolution", 8) == 0
    monkeypatch.chdir(digits.parent)
    assert encode("--input", f"{digits.name}/", "--output", out, "--vae", "pixel", "--resolution", 8) == 0


def test_nothing_encodable_is_an_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    assert encode("--input", tmp_path / "in", "--output", tmp_path / "out", "--vae", "pixel") == 1
    assert "no input image could be encoded" in capsys.readouterr().err
    assert manifest(tmp_path / "out")["skipped"] == [{"source": "a.png", "reason": "empty file"}]


# Object storage: a real S3 API (moto server on loopback) through s3fs.


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )


def test_folder_to_s3_and_back(digits, s3, tmp_path):
    options = json.dumps({**s3.storage_options, "key": CANARY_KEY_ID, "secret": CANARY_SECRET})
    url = s3.url("latents", "digits")
    encode_args = [
        "--input",
        digits,
        "--output",
        url,
        "--vae",
        "pixel",
        "--resolution",
        8,
        "--shard-size",
        64,
        "--storage-options",
        options,
    ]
    result = run_module("data_tools.encode_latents", *encode_args, "--num-workers", 2)
    assert result.returncode == 0, result.stderr
    inspected = run_module("data_tools.inspect_shards", url, "--storage-options", options)
    assert inspected.returncode == 0 and "300 samples in 5 shards" in inspected.stdout, inspected.stdout

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    written = b"".join(fs.cat_file(p) for p in fs.find(f"{s3.bucket}/latents/digits") if not p.endswith(".tar"))
    for text in (written.decode(), result.stdout, result.stderr, inspected.stdout, inspected.stderr):
        assert CANARY_KEY_ID not in text and CANARY_SECRET not in text
    assert json.loads(fs.cat_file(f"{s3.bucket}/latents/digits/manifest.json"))["num_samples"] == 300

    again = run_module("data_tools.encode_latents", *encode_args)
    assert again.returncode == 0 and "5 units were already done" in again.stderr, again.stderr


def test_missing_bucket_fails_before_encoding(digits, s3, capsys):
    url = f"s3://no-such-bucket-{s3.bucket}/x"
    assert (
        encode(
            "--input", digits, "--output", url, "--vae", "pixel", "--storage-options", json.dumps(s3.storage_options)
        )
        == 2
    )
    assert "does not exist or is not reachable" in capsys.readouterr().err


def img2dataset_tar(images: list[tuple[str, np.ndarray, int, str]]) -> bytes:
    """A tar as img2dataset writes it: key.jpg, key.cls, key.json, key.txt."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, pixels, label, caption in images:
            jpg = io.BytesIO()
            Image.fromarray(pixels).save(jpg, "PNG")
            members = {
                "png": jpg.getvalue(),
                "cls": str(label).encode(),
                "txt": caption.encode(),
                "json": json.dumps({"url": f"https://example.invalid/{key}", "caption": caption}).encode(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_shards_on_s3_as_input(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    rng = np.random.default_rng(0)
    for shard in range(3):
        images = [
            (
                f"{shard:05d}{i:04d}",
                rng.integers(0, 256, (12, 12, 3), dtype=np.uint8),
                (shard + i) % 4,
                f"caption {shard} {i}",
            )
            for i in range(7)
        ]
        fs.pipe_file(f"{s3.bucket}/images/{shard:05d}.tar", img2dataset_tar(images))
    fs.pipe_file(f"{s3.bucket}/images/00003.tar", img2dataset_tar(images)[:3000])  # truncated mid-stream

    out = tmp_path / "out"
    assert (
        encode(
            "--input",
            s3.url("images", "{00000..00003}.tar"),
            "--output",
            out,
            "--vae",
            "pixel",
            "--resolution",
            8,
            "--shard-size",
            5,
            "--num-workers",
            2,
            "--storage-options",
            json.dumps(s3.storage_options),
        )
        == 0
    )
    m = manifest(out)
    assert [s["name"] for s in m["shards"]][:3] == ["000000-000.tar", "000000-001.tar", "000001-000.tar"]
    assert m["labels"]["labelled"] and m["labels"]["num_classes"] == 4
    assert [s["source"] for s in m["skipped"] if s["reason"].startswith("damaged tar")] == [
        s3.url("images", "00003.tar")
    ]
    samples = all_samples(out)
    assert len(samples) == 21  # the truncated tar held less than one whole sample
    first = samples[0]
    assert first["__key__"] == "00000/000000000" and int(first["cls"]) == 0
    assert json.loads(first["json"])["caption"] == "caption 0 0"

    assert (
        encode(
            "--input",
            s3.url("images", "{00000..00005}.tar"),
            "--output",
            tmp_path / "o2",
            "--vae",
            "pixel",
            "--storage-options",
            json.dumps(s3.storage_options),
        )
        == 2
    )
