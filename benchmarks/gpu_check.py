"""The GPU check in one command: training from shards, kill -9 and resume, sampling, headline throughput.

bash benchmarks/gpu_check.sh [--out DIR]       on a machine with one GPU, at most 8 minutes
python benchmarks/gpu_check.py --device cpu     the same parts on the CPU with tiny settings (tests/test_gpu_check.py)

Parts, in this order (the long throughput part last, so that a timeout still leaves the others):
  data        the demo's digits as latent shards: python -m data_tools.make_digits, then
              python -m data_tools.encode_latents --vae pixel --resolution 8, as launch/demo.py does.
  train       python -m launch.train configs/demo.yaml as one process (NCCL on CUDA, gloo on CPU)
              for N steps with the loss logged every step. Pass: exit 0, N finite losses, an export,
              and GPU memory in its metrics on CUDA (none on CPU).
  resume      the same run again, killed with SIGKILL (the trainer and its data worker) a few
              steps after its checkpoint at step C, then restarted. Pass: it resumed from its newest
              checkpoint (C) and its losses of steps C+1..N match the uninterrupted run's within the
              tolerance below.
  sample      python -m launch.sample from the uninterrupted run's export. Pass: exit 0 and one
              image per requested sample, not all alike.
  throughput  python benchmarks/gpu_throughput.py --quick (on CPU: UNet-T at 4×8×8, eager only).
              Pass: every row measured. Figures: trainer / plain-loop ratios and MFU.

Resume tolerance. On the CPU the trainer is bitwise deterministic, so the losses must be equal.
On CUDA with deterministic algorithms off (the trainer's default), cuDNN's and SDPA's backward
kernels add in an unfixed order, so two runs from the same seed differ by float32 rounding:
~1e-7 relative per step, growing slowly over a few dozen steps. A resume bug (another batch,
noise draw or label dropout, or Adam moments lost) changes a 64-sample loss by 1e-3 or more.
Accepted: a max relative difference of max(1e-5, 10 × the floor), where the floor is the largest
difference the two runs show on steps 1..C, before the kill, when both started fresh (the
nondeterminism this machine really has). Both figures are reported.

Every part's result and figures go to DIR/gpu_check.json (rewritten after each part) and one
table at the end; DIR also gets the throughput JSON and the sample grid. Scratch files (shards,
runs, logs) go to --work (a temporary folder by default). Exit status 0 when every part passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).parents[1]

# Per device: training steps, checkpoint interval, the step after which the run is killed, the
# throughput arguments, each command's time limit and the whole check's (s).
SETTINGS = {
    "cuda": {
        "steps": 80,
        "checkpoint": 20,
        "kill_after": 22,
        "throughput": ["--quick"],
        "limits": {"data": 120, "train": 150, "sample": 120, "throughput": 420},
        "budget": 470,  # 8 minutes, less the shell's pip install
    },
    "cpu": {
        "steps": 16,
        "checkpoint": 6,
        "kill_after": 7,
        "throughput": [
            *("--device", "cpu", "--sizes", "UNet-T", "--resolutions", "8", "--batch", "4"),
            *("--zero", "0", "1", "2", "--variants", "eager", "--steps", "2", "--warmup", "1"),
        ],
        "limits": {"data": 120, "train": 120, "sample": 120, "throughput": 300},
        "budget": 900,
    },
}
RESUME_TOLERANCE = 1e-5  # relative, before scaling by the measured floor (module docstring)


class Check:
    """Runs the parts, records pass/fail and figures, and keeps DIR/gpu_check.json current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.settings = args, SETTINGS[args.device]
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "DS_ACCELERATOR": args.device, "PYTHONUNBUFFERED": "1"}
        if args.device == "cpu":
            self.env["OMP_NUM_THREADS"] = "1"  # one process per core: the test machine has two
        self.parts: list[dict] = []
        self.started = time.perf_counter()

    def part(self, name: str, run: Callable[[], dict]) -> None:
        """Run one part; its figures, or the error that stopped it, go into the summary."""
        started = time.perf_counter()
        try:
            figures = run()
            ok = bool(figures.pop("pass"))
        except Exception as e:  # noqa: BLE001 - a failed part is reported, and the next one still runs
            ok, figures = False, {"error": f"{type(e).__name__}: {e}"}
        self.parts.append({"part": name, "pass": ok, "seconds": time.perf_counter() - started, "figures": figures})
        print(f"[gpu_check] {name}: {'pass' if ok else 'FAIL'} {json.dumps(figures)}", flush=True)
        self.write()

    def write(self) -> None:
        summary = {
            "device": self.args.device,
            "pass": all(p["pass"] for p in self.parts),
            "wall_s": time.perf_counter() - self.started,
            "parts": self.parts,
        }
        (self.out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")

    def command(self, name: str, argv: list[str], limit_key: str) -> subprocess.CompletedProcess:
        """Run `python argv` from the project root with its output in WORK/logs/NAME.log; raise if it fails
        or outlasts its limit or what is left of the whole check's budget."""
        budget_left = self.settings["budget"] - (time.perf_counter() - self.started)
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            result = subprocess.run(
                [sys.executable, *argv],
                cwd=ROOT,
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, min(self.settings["limits"][limit_key], budget_left)),
            )
        if result.returncode:
            raise RuntimeError(f"{' '.join(argv[:3])} exited with {result.returncode}: {tail(log)}")
        return result

    def train_args(self, run_dir: Path) -> list[str]:
        s = self.settings
        return [
            *("-m", "launch.train", "configs/demo.yaml"),
            f"run.dir={run_dir}",
            f"data.url={self.work / 'latents'}",
            f"train.max_steps={s['steps']}",
            "train.warmup_steps=5",
            f"checkpoint.every={s['checkpoint']}",
            "tracking.log_every=1",  # every step's loss, to compare runs step by step
            "tracking.enabled=false",  # MLflow is not installed on the GPU image; tests/test_tracking.py covers it
            "tracking.sample_every=0",
        ]

    # The parts.

    def data(self) -> dict:
        images = self.work / "digits"
        self.command("make_digits", ["-m", "data_tools.make_digits", str(images)], "data")
        encode = ["-m", "data_tools.encode_latents", "--input", str(images), "--output", str(self.work / "latents")]
        encode += ["--vae", "pixel", "--resolution", "8", "--shard-size", "200", "--num-workers", "1"]
        self.command("encode_latents", encode, "data")
        manifest = json.loads((self.work / "latents" / "manifest.json").read_text())
        return {"pass": manifest["num_samples"] > 0, "samples": manifest["num_samples"]}

    def train(self) -> dict:
        run_dir = self.work / "whole"
        self.command("train", self.train_args(run_dir), "train")
        records, losses = read_metrics(run_dir), step_losses(run_dir)
        times = [r["step_time_s"] for r in records.values()]
        steps = self.settings["steps"]
        # The trainer logs GPU memory only when it trains on a GPU (and then its process group is NCCL's).
        gpu_memory = max((r.get("memory/gpu_peak_allocated_gb", 0.0) for r in records.values()), default=0.0)
        device = "cuda" if gpu_memory else "cpu"
        exported = (run_dir / "export" / "ema.safetensors").exists()
        finite = sorted(losses) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in losses.values())
        return {
            "pass": finite and exported and device == self.args.device,
            "steps": len(losses),
            "device": device,
            "gpu_peak_allocated_gb": gpu_memory,
            "first_loss": losses.get(1),
            "last_loss": losses.get(steps),
            "steps_per_s": 1 / float(np.median(times[len(times) // 2 :])),  # the second half: start-up excluded
            "export": exported,
        }

    def resume(self) -> dict:
        s = self.settings
        run_dir, log = self.work / "killed", self.work / "logs" / "killed.log"
        with log.open("w") as f:
            process = subprocess.Popen(
                [sys.executable, *self.train_args(run_dir)], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT
            )
            try:
                reached = wait_for_step(run_dir, s["kill_after"], process, s["limits"]["train"])
            finally:
                kill_tree(process)
        if reached >= s["steps"]:
            raise RuntimeError(f"the run finished (step {reached}) before it could be killed; raise the step count")
        self.command("restart", self.train_args(run_dir), "train")
        logged = [r["step"] for r in read_records(run_dir)]
        restart = next(i for i in range(1, len(logged)) if logged[i] <= logged[i - 1])
        resumed_from = logged[restart] - 1
        # The newest checkpoint before the kill; the one before it if the kill came while saving.
        newest = reached // s["checkpoint"] * s["checkpoint"]
        from_checkpoint = resumed_from in (newest, newest - s["checkpoint"]) and resumed_from > 0
        whole, resumed = step_losses(self.work / "whole"), step_losses(run_dir)
        floor = max_relative_difference(whole, resumed, range(1, resumed_from + 1))
        difference = max_relative_difference(whole, resumed, range(resumed_from + 1, s["steps"] + 1))
        tolerance = 0.0 if self.args.device == "cpu" else max(RESUME_TOLERANCE, 10 * floor)
        return {
            "pass": from_checkpoint and difference <= tolerance,
            "killed_at_step": reached,
            "resumed_from_step": resumed_from,
            "max_rel_diff_after_resume": difference,
            "max_rel_diff_fresh_runs": floor,
            "tolerance": tolerance,
        }

    def sample(self) -> dict:
        out = self.out / "samples"
        argv = ["-m", "launch.sample", str(self.work / "whole"), "--per-class", "2", "--steps", "20"]
        self.command("sample", [*argv, "--seed", "0", "--out", str(out), "--device", self.args.device], "sample")
        images = np.load(out.with_suffix(".npz"))["images"]
        return {"pass": len(images) == 20 and images.std() > 0, "images": len(images), "shape": list(images.shape)}

    def throughput(self) -> dict:
        report = self.out / "throughput.json"
        report.unlink(missing_ok=True)  # from an earlier check into the same folder
        argv = ["benchmarks/gpu_throughput.py", *self.settings["throughput"], "--json", str(report)]
        try:
            self.command("throughput", argv, "throughput")
            error = None
        except subprocess.TimeoutExpired as e:  # the rows measured so far are in the JSON (written after each)
            error = f"timed out after {e.timeout:.0f} s"
        print(tail(self.work / "logs" / "throughput.log", 20_000), flush=True)  # its table
        rows = json.loads(report.read_text())["results"] if report.exists() else []
        figures = dict(map(throughput_figure, rows))
        if error:
            figures["error"] = error
        return {"pass": not error and bool(rows) and all("img_per_s" in r for r in rows), **figures}


def throughput_figure(row: dict) -> tuple[str, str]:
    """("UNet-XL trainer ZeRO-2 compile", "590.1 img/s, MFU 38.2%, 0.981× plain") for a gpu_throughput row."""
    stage = "" if row["zero"] is None else f" ZeRO-{row['zero']}"
    name = f"{row['size']} {row['loop']}{stage} {row['variant']}"
    if "img_per_s" not in row:
        return name, row["error"]
    ratio = f", {row['ratio']:.3f}× plain" if "ratio" in row else ""
    return name, f"{row['img_per_s']:.1f} img/s, MFU {row['mfu']:.1%}{ratio}"


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records in order (a line being written is skipped)."""
    records = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run rewrites the steps after its checkpoint)."""
    return {r["step"]: r for r in read_records(run_dir) if "loss" in r}


def step_losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in read_metrics(run_dir).items()}


def max_relative_difference(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    """max over steps of |a - b| / |a|; inf where a step is missing from either run."""
    if any(s not in a or s not in b for s in steps):
        return math.inf
    return max((abs(a[s] - b[s]) / abs(a[s]) for s in steps), default=0.0)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float) -> int:
    """The last logged step once it is >= step (polled often: GPU steps take milliseconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_records(run_dir)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        if process.poll() is not None:
            raise RuntimeError(f"training exited with {process.returncode} before step {step}")
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def kill_tree(process: subprocess.Popen) -> None:
    """kill -9 the trainer and every process under it (its data workers)."""
    if process.poll() is not None:
        return
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait()


def tail(log: Path, chars: int = 2000) -> str:
    return log.read_text()[-chars:] if log.exists() else ""


def print_summary(check: Check) -> None:
    print("\n| part | result | time (s) | figures |\n|---|---|---|---|")
    for p in check.parts:
        figures = "; ".join(f"{k}: {format_figure(v)}" for k, v in p["figures"].items())
        print(f"| {p['part']} | {'pass' if p['pass'] else 'FAIL'} | {p['seconds']:.0f} | {figures} |")
    passed = all(p["pass"] for p in check.parts)
    wall = time.perf_counter() - check.started
    verdict = "PASS" if passed else "FAIL"
    print(f"\ngpu_check ({check.args.device}): {verdict} in {wall:.0f} s; {check.out / 'gpu_check.json'}")


def format_figure(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SETTINGS), default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="summary and figures")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check-")
    check = Check(args)
    check.part("data", check.data)
    check.part("train", check.train)
    check.part("resume", check.resume)
    check.part("sample", check.sample)
    check.part("throughput", check.throughput)
    print_summary(check)
    return 0 if all(p["pass"] for p in check.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
