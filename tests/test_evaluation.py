"""FID and IS: the Fréchet distance against numpy/scipy and closed forms, the Inception Score in
closed form, launch.evaluate on the digits with a small feature network trained here (sweep,
report, plot, MLflow child run, three kinds of reference), the in-training FID equal to
launch.evaluate on the export, and errors for missing weights and bad input before any work."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion_dist.evaluation import FeatureNet, frechet_distance, inception_score, reference_statistics, statistics
from launch import evaluate
from tests.conftest import ROOT, free_port
from tests.fid_features import SPEC
from tests.test_train import ENV, overrides, train

pytestmark = pytest.mark.slow  # every test here starts processes

EVAL_SETTINGS = {"num_samples": 200, "cfg_scale": 1.5, "sample_steps": 10, "sampler": "ddim", "batch_size": 64}


def test_frechet_distance_matches_numpy_and_scipy():
    """Statistics and distance against an independent computation: np.cov and scipy.linalg.sqrtm."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 12)) @ rng.normal(size=(12, 12)) + 1.0
    b = 0.7 * rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) - 0.5
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * scipy.linalg.sqrtm(sigma_a @ sigma_b).real)

    stats_a, stats_b = statistics(torch.from_numpy(a)), statistics(torch.from_numpy(b))
    np.testing.assert_allclose(stats_a["mu"], mu_a, rtol=1e-12)
    np.testing.assert_allclose(stats_a["sigma"], sigma_a, rtol=1e-12)
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(stats_a, stats_a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    """Commuting covariances: ‖μ₁ − μ₂‖² + Σ_i (√a_i − √b_i)²."""
    variances_a, variances_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    stats_a = {"mu": np.array([0.0, 1.0, 2.0]), "sigma": np.diag(variances_a)}
    stats_b = {"mu": np.array([1.0, 1.0, 0.0]), "sigma": np.diag(variances_b)}
    expected = 1 + 4 + ((np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2).sum()
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-12)


def test_inception_score_in_closed_form():
    """Confident predictions: IS = exp(H(p(y))), the number of classes when they are balanced."""
    confident = 40.0 * torch.eye(5, dtype=torch.float64)
    balanced = confident[torch.arange(200) % 5]
    assert inception_score(balanced, splits=1)[0] == pytest.approx(5.0, rel=1e-6)
    skewed = confident[torch.tensor([0, 0, 0, 1] * 50)]  # p(y) = (3/4, 1/4)
    assert inception_score(skewed, splits=1)[0] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert inception_score(confident[torch.zeros(50, dtype=torch.long)], splits=1)[0] == pytest.approx(1.0)


def eval_overrides(weights: Path, every: int) -> dict[str, str]:
    settings = {f"eval__{k}": v for k, v in EVAL_SETTINGS.items()}
    return {
        "eval__every": every,
        "eval__reference_samples": 1797,
        "eval__feature_extractor": SPEC,
        "eval__feature_weights": weights,
        **settings,
    }


@pytest.fixture(scope="module")
def fid_run(digits_latents, digit_weights, tmp_path_factory) -> Path:
    """200 steps on 2 ranks with an FID every 100 steps and MLflow in the run's local store."""
    run_dir = tmp_path_factory.mktemp("fid-run")
    args = overrides(
        run_dir,
        digits_latents,
        train__max_steps=200,
        model__dropout=0.1,  # draws from the training RNG every step: the FID must not shift them
        tracking__enabled="true",
        tracking__log_every=50,
        tracking__sample_every=0,
        **eval_overrides(digit_weights, every=100),
    )
    result = train(args, ranks=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def fid_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "fid" in r}


def run_evaluate(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    return subprocess.run(
        [*launcher, "-m", "launch.evaluate", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_in_training_fid_is_logged_and_equals_launch_evaluate_on_the_export(fid_run, digits_latents, digit_weights):
    """The FID at the last step (2 ranks, EMA weights) is the FID launch.evaluate gives the export
    with the same settings on 1 and on 2 ranks: same samples, same reference, whatever the ranks."""
    records = fid_records(fid_run)
    assert sorted(records) == [100, 200]
    assert all(r["fid"] > 0 and r["inception_score"] >= 1 for r in records.values())
    assert (fid_run / "eval" / "reference-stats.npz").is_file()  # computed once, for resumes

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{fid_run / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((fid_run / "export" / "config.json").read_text())["tracking"]["run_id"]
    history = client.get_metric_history(run_id, "fid")
    assert {m.step: m.value for m in history} == {s: r["fid"] for s, r in records.items()}

    arguments = [
        *("--num-samples", EVAL_SETTINGS["num_samples"], "--cfg-scale", EVAL_SETTINGS["cfg_scale"]),
        *("--steps", EVAL_SETTINGS["sample_steps"], "--sampler", EVAL_SETTINGS["sampler"], "--seed", 0),
        *("--reference", digits_latents, "--reference-samples", 1797, "--batch-size", EVAL_SETTINGS["batch_size"]),
        *("--feature-extractor", SPEC, "--feature-weights", digit_weights, "--no-tracking"),
    ]
    for ranks in (1, 2):
        out = fid_run / "eval" / f"same-settings-{ranks}"
        result = run_evaluate(fid_run, *arguments, "--out", out, ranks=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["world_size"] == ranks
        assert report["results"][0]["fid"] == pytest.approx(records[200]["fid"], rel=1e-9)
        assert report["reference"] == {"source": str(digits_latents), "kind": "dataset", "num_samples": 1797}


def test_resumed_run_reuses_the_reference_statistics(fid_run, digits_latents, digit_weights, tmp_path):
    """A restart reads the cached reference (rank 0 decides, both ranks agree) and logs FID on."""
    run_dir = tmp_path / "run"
    shutil.copytree(fid_run, run_dir)
    cache = run_dir / "eval" / "reference-stats.npz"
    before = cache.stat().st_mtime_ns
    args = overrides(
        run_dir,
        digits_latents,
        train__max_steps=300,
        model__dropout=0.1,
        tracking__log_every=50,
        tracking__sample_every=0,
        **eval_overrides(digit_weights, every=100),
    )
    result = train(args, ranks=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert sorted(fid_records(run_dir)) == [100, 200, 300]
    assert cache.stat().st_mtime_ns == before


def test_fid_does_not_change_the_training_trajectory(fid_run, digits_latents, digit_weights, tmp_path):
    """Sampling for FID draws from its own generators: losses match a run without it bit for bit."""
    args = overrides(tmp_path, digits_latents, train__max_steps=200, tracking__log_every=50, model__dropout=0.1)
    assert train(args, ranks=2, timeout=600).returncode == 0

    def losses(run_dir: Path) -> dict[int, float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert losses(fid_run) == losses(tmp_path)


def test_evaluate_sweep_writes_report_plot_and_mlflow_child_run(fid_run, digits_latents, digit_weights, tmp_path):
    """A w sweep against the digits as an image folder: the report, a plot that holds its numbers, the
    same scores in MLflow under the training run; the folder's statistics equal the decoded dataset's
    (lossless pixel codec), and scoring against the saved statistics gives the same FID."""
    from data_tools.make_digits import write_digits

    write_digits(tmp_path / "images")
    out = tmp_path / "sweep"
    common = ["--num-samples", 200, "--steps", 10, "--sampler", "ddpm", "--feature-extractor", SPEC]
    common += ["--feature-weights", digit_weights]
    result = run_evaluate(
        fid_run, *common, "--cfg-scale", "0,2", "--reference", tmp_path / "images", "--out", out,
        "--save-reference-stats", tmp_path / "reference.npz",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["cfg_scale"] for r in report["results"]] == [0.0, 2.0]
    assert report["reference"]["kind"] == "images" and report["reference"]["num_samples"] == 1797
    assert report["best"]["fid"] == min(r["fid"] for r in report["results"])
    assert "best: w =" in result.stdout

    # The plot: a PNG, and an SVG whose labelled points are the report's FIDs.
    from PIL import Image

    assert Image.open(out / "fid_vs_cfg.png").size[0] > 100
    svg = ElementTree.parse(out / "fid_vs_cfg.svg").getroot()
    groups = {g.get("id"): g for g in svg.iter("{http://www.w3.org/2000/svg}g")}
    for r in report["results"]:
        text = "".join(groups[f"fid-w{r['cfg_scale']:g}"].itertext()).strip()
        assert text == f"{r['fid']:.2f}"

    # MLflow: a child of the training run, with the scores and the report.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{fid_run / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(report["mlflow_run_id"])
    assert (
        run.data.tags["mlflow.parentRunId"]
        == json.loads((fid_run / "export/config.json").read_text())["tracking"]["run_id"]
    )
    for r in report["results"]:
        assert run.data.metrics[f"fid/cfg_{r['cfg_scale']:g}"] == pytest.approx(r["fid"])
    assert run.data.params["reference"] == str(tmp_path / "images")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {
        "eval/report.json",
        "eval/fid_vs_cfg.svg",
    }

    # The folder's statistics are those of the decoded dataset, and they score the same.
    saved = np.load(tmp_path / "reference.npz")
    assert str(saved["feature_extractor"]) == SPEC
    features = FeatureNet(SPEC, str(digit_weights), "cpu")
    from_dataset = reference_statistics(str(digits_latents), features, limit=1797, batch_size=64)
    # Same images; float32 features differ in the last bits with the batching (per shard vs per 64 files).
    np.testing.assert_allclose(saved["mu"], from_dataset["mu"], rtol=1e-6)
    np.testing.assert_allclose(saved["sigma"], from_dataset["sigma"], rtol=1e-5, atol=1e-6)
    again = run_evaluate(
        fid_run, *common, "--cfg-scale", 2, "--reference", tmp_path / "reference.npz", "--no-tracking",
        "--out", tmp_path / "again",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    fid = json.loads((tmp_path / "again" / "report.json").read_text())["results"][0]["fid"]
    assert fid == pytest.approx(report["results"][1]["fid"], rel=1e-9)


def test_evaluate_refuses_bad_input_before_sampling(
    fid_run, digits_latents, digit_weights, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no InceptionV3 weights there

    def error(*args) -> str:
        assert evaluate.main([str(fid_run), "--num-samples", "20", "--no-tracking", *map(str, args)]) == 2
        return capsys.readouterr().err

    reference = ["--reference", str(digits_latents)]
    message = error(*reference, "--out", tmp_path / "out")
    missing = tmp_path / "torch-home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(missing) in message and "github.com/toshas/torch-fidelity/releases" in message
    assert "--feature-weights" in message and "--download-weights" in message
    assert not (tmp_path / "out").exists()  # nothing written, nothing downloaded

    assert "no such file" in error(*reference, "--feature-extractor", SPEC, "--feature-weights", tmp_path / "nope.pt")
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump({"weights": object()}, f, protocol=2)
    assert "not a plain state dict" in error(
        *reference, "--feature-extractor", SPEC, "--feature-weights", tmp_path / "pickled.pt"
    )
    assert "cannot be imported" in error(*reference, "--feature-extractor", "tests.no_such_module:Net")
    assert "neither a statistics .npz" in error("--reference", tmp_path / "missing", "--feature-extractor", SPEC)
    assert "no such statistics file" in error("--reference", tmp_path / "missing.npz", "--feature-extractor", SPEC)
    np.savez(tmp_path / "other.npz", mu=np.zeros(3), sigma=np.eye(3), feature_extractor=SPEC)
    assert "statistics of 3 features" in error("--reference", tmp_path / "other.npz", "--feature-extractor", SPEC)
    np.savez(tmp_path / "inception.npz", mu=np.zeros(64), sigma=np.eye(64), feature_extractor="inception-v3-compat")
    assert "computed with the feature extractor" in error(
        "--reference", tmp_path / "inception.npz", "--feature-extractor", SPEC
    )
    assert "FID needs at least 2" in error(*reference, "--feature-extractor", SPEC, "--num-samples", 1)
    assert "not a classifier" in error(*reference, "--feature-extractor", SPEC, "--classifier", fid_run)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text("{}")
    assert "holds a report already" in error(*reference, "--feature-extractor", SPEC, "--out", tmp_path / "done")
    assert (tmp_path / "done" / "report.json").read_text() == "{}"


def test_training_with_fid_and_missing_weights_stops_before_training(digits_latents, tmp_path):
    """eval.every with InceptionV3 weights absent: exit 2 naming the file and eval.feature_weights."""
    args = overrides(tmp_path / "run", digits_latents, eval__every=10)
    result = train(args, ranks=0, env={**ENV, "TORCH_HOME": str(tmp_path / "torch-home")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "weights-inception-2015-12-05-6726825d.pth" in result.stderr and "eval.feature_weights" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
