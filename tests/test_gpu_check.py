"""benchmarks/gpu_check.py end to end on the CPU: every part of the GPU check but the GPU itself."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_passes_every_part_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(tmp_path / "out")]
        + ["--work", str(tmp_path / "work")],
        cwd=ROOT,
        env={**env, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == ["data", "train", "resume", "sample", "throughput"]
    failed = {name: p["figures"] for name, p in parts.items() if not p["pass"]}
    assert not failed, f"{failed}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0 and summary["pass"]
    assert "| resume | pass |" in result.stdout  # the one summary table
    # On the CPU the resumed run repeats the uninterrupted one bit for bit.
    assert parts["resume"]["figures"]["max_rel_diff_after_resume"] == 0.0
    assert parts["resume"]["figures"]["resumed_from_step"] < parts["resume"]["figures"]["killed_at_step"]
    rows = json.loads((tmp_path / "out" / "throughput.json").read_text())["results"]
    assert [(r["loop"], r["zero"]) for r in rows] == [("plain", None), ("trainer", 0), ("trainer", 1), ("trainer", 2)]
    assert all(r["ratio"] > 0 and r["mfu"] > 0 for r in rows[1:])
