"""Steps/s of launch.train's loop against a bare PyTorch loop, in one run.

python benchmarks/trainer.py [--size UNet-T] [--resolution 32] [--batch 16] [--steps 40]

Both train the same UNet on the same synthetic 4×R×R latents with the same loss, batch,
AdamW and fp32 on one CPU process. The trainer streams the latents from an in-memory
(memory://) dataset through LatentLoader and runs inside DeepSpeed (ZeRO-0) with EMA,
metrics and the preemption check; checkpoints are off. Its rate is taken from the
metrics of the second half of the run, so start-up is excluded, as it is for the bare
loop after its warm-up steps. Target: >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from fsspec.implementations.memory import MemoryFileSystem

sys.path.insert(0, str(Path(__file__).parents[1]))
from diffusion_dist.config import load_config  # noqa: E402
from diffusion_dist.diffusion import GaussianDiffusion, diffusion_draws, diffusion_loss  # noqa: E402
from diffusion_dist.distributed import process_from_env  # noqa: E402
from diffusion_dist.models import build_unet  # noqa: E402
from diffusion_dist.train.loop import train  # noqa: E402
from tests.latent_data import write_dataset  # noqa: E402


def bare_loop(args, latents: torch.Tensor, labels: torch.Tensor) -> float:
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.from_schedule("linear", variance="learned_range")
    model = build_unet(args.size, 4, 1000, learn_sigma=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    warmup = args.steps // 2
    for step in range(args.steps):
        if step == warmup:
            start = time.perf_counter()
        i = (step * args.batch) % (len(latents) - args.batch)
        x0 = latents[i : i + args.batch]
        draws = diffusion_draws(generator, x0.shape, diffusion.num_timesteps, p_uncond=0.1)
        loss = diffusion_loss(model, diffusion, x0, labels[i : i + args.batch], draws, null_label=1000)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return (args.steps - warmup) / (time.perf_counter() - start)


def trainer(args, run_dir: Path) -> tuple[float, float]:
    """Steps/s and the fraction of time spent waiting for data, over the second half of the run."""
    overrides = [
        f"run.dir={run_dir}",
        "data.url=memory://bench",
        "data.num_workers=0",
        f"model.size={args.size}",
        "model.num_classes=1000",
        "diffusion.schedule=linear",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        "train.precision=fp32",
        "train.zero_stage=0",
        "train.lr=1e-4",
        "train.warmup_steps=0",
        f"checkpoint.every={10**9}",
        f"tracking.log_every={args.steps // 2}",
        "run.preempt_signals=[]",
    ]
    config = load_config("configs/demo.yaml", overrides)
    assert train(config, process_from_env({})) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["samples_per_s"] / args.batch, records[-1]["data_wait_fraction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="UNet-T")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    samples = 4 * args.batch * args.steps
    write_dataset(
        "bench",
        [samples // 4] * 4,
        fs=MemoryFileSystem(),
        shape=(4, args.resolution, args.resolution),
        flip=False,
        num_classes=1000,
        mean=0.0,
        std=1.0,
    )
    latents = torch.randn(samples, 4, args.resolution, args.resolution)
    labels = torch.randint(0, 1000, (samples,))
    with tempfile.TemporaryDirectory() as tmp:
        ours, data_wait = trainer(args, Path(tmp))
    bare = bare_loop(args, latents, labels)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"{args.size} at 4×{args.resolution}×{args.resolution}, batch {args.batch}, fp32, AdamW, one process")
    print(f"bare PyTorch loop: {bare:.3f} steps/s")
    print(f"launch.train loop: {ours:.3f} steps/s")
    print(f"ratio: {ours / bare:.3f} (target >= 0.95)")
    print(f"launch.train waited for data {data_wait:.1%} of the time (in-process loading, no workers)")


if __name__ == "__main__":
    main()
