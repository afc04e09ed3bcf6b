"""Training throughput and model FLOP utilisation of each named UNet size on one GPU, bf16.

python benchmarks/gpu_throughput.py [--sizes UNet-S UNet-B ...] [--resolutions 32 64] [--batch 64]
       [--zero 0 2] [--variants eager compile channels_last compile+channels_last] [--steps 20]
       [--device cuda] [--json results.json]

For each size, latent resolution (4×32×32 is 256 px, 4×64×64 is 512 px), ZeRO stage and variant
(eager; train.compile; train.channels_last; both) it trains with the project's DeepSpeed
engine and loss (learned variance, DDPM-IP, label dropout) on random latents and reports img/s,
step time, peak memory, training FLOPs per sample (forward + backward, by
torch.utils.flop_counter) and MFU = img/s × FLOPs per sample / peak. The peak is the card's
bf16 matmul rate measured in the same run (a large bf16 matmul), not the datasheet's. A
configuration that does not fit is reported as OOM. --device cpu runs the same code as a smoke
test (figures from a CPU mean nothing for GPUs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from flops import FlopCounterMode  # torch's, also counting the CPU flash-attention kernel

sys.path.insert(0, str(Path(__file__).parents[1]))
from diffusion_dist.config import load_config  # noqa: E402
from diffusion_dist.diffusion import GaussianDiffusion, diffusion_loss  # noqa: E402
from diffusion_dist.distributed import init_process_group, process_from_env  # noqa: E402
from diffusion_dist.models import UNET_SIZES, build_unet  # noqa: E402
from diffusion_dist.train.engine import build_engine  # noqa: E402

VARIANTS = ("eager", "compile", "channels_last", "compile+channels_last")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 FLOP/s of an n×n×n matmul: the ceiling MFU is taken against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def train_flops_per_sample(size: str, resolution: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one sample (the optimizer's are negligible)."""
    model = build_unet(size, 4, 1000, learn_sigma=True).to(device)
    z = torch.randn(1, 4, resolution, resolution, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model(z, t, t).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def time_steps(engine, config, diffusion: GaussianDiffusion, latents, labels, args: argparse.Namespace) -> float:
    """Seconds per training step after args.warmup steps (compilation, cuDNN autotuning, allocator)."""
    layout = torch.channels_last if config.train.channels_last else torch.contiguous_format  # as the trainer

    def model_fn(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return engine(z.to(torch.bfloat16, memory_format=layout), t, y).float()

    def step() -> None:
        loss = diffusion_loss(model_fn, diffusion, latents, labels, null_label=1000)["loss"].mean()
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    synchronize(latents.device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(latents.device)
    return (time.perf_counter() - started) / args.steps


def run(size: str, resolution: int, zero: int, variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    """img/s, step time and peak memory of one configuration, or {"error": ...}."""
    overrides = [
        f"model.size={size}",
        "model.num_classes=1000",
        "train.precision=bf16",
        f"train.zero_stage={zero}",
        f"train.micro_batch_size={args.batch}",
        f"train.global_batch_size={args.batch}",
        # The trainer's own switches: torch.compile of the UNet's forward, NHWC activations.
        f"train.compile={'compile' in variant}",
        f"train.channels_last={'channels_last' in variant}",
    ]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_unet(size, 4, 1000, learn_sigma=True).to(device)
    diffusion = GaussianDiffusion.from_schedule("linear", 1000, "learned_range")
    latents = torch.randn(args.batch, 4, resolution, resolution, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    gc.collect()  # the previous configuration's engine (reference cycles) must not count here
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = time_steps(build_engine(model, config, 1, device), config, diffusion, latents, labels, args)
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # noqa: BLE001 - one failing variant (e.g. a compile error) must not end the sweep
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"img_per_s": args.batch / seconds, "step_time_s": seconds, "peak_memory_gib": peak_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(UNET_SIZES), choices=list(UNET_SIZES))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[32, 64], help="latent sides")
    parser.add_argument("--batch", type=int, default=64, help="samples per step (one GPU)")
    parser.add_argument("--zero", nargs="+", type=int, default=[0, 2], choices=[0, 1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    init_process_group(process_from_env(), device)  # DeepSpeed wants a process group, even of one
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = matmul_peak(device, n=8192 if device.type == "cuda" else 1024, repeats=20 if device.type == "cuda" else 3)
    print(f"{card}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; batch {args.batch}, {args.steps} steps")
    print("| size | latent | ZeRO | variant | img/s | step (ms) | peak mem (GiB) | train GFLOPs/img | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for size in args.sizes:
        for resolution in args.resolutions:
            flops = train_flops_per_sample(size, resolution, device)
            for zero in args.zero:
                for variant in args.variants:
                    result = run(size, resolution, zero, variant, args, device)
                    row = {"size": size, "latent": f"4x{resolution}x{resolution}", "zero": zero, "variant": variant}
                    row.update(result, train_gflops_per_sample=flops / 1e9)
                    if "img_per_s" in result:
                        row["mfu"] = result["img_per_s"] * flops / peak
                        cells = [
                            f"{row['img_per_s']:.1f}",
                            f"{row['step_time_s'] * 1000:.0f}",
                            f"{row['peak_memory_gib']:.1f}",
                            f"{flops / 1e9:.1f}",
                            f"{row['mfu']:.1%}",
                        ]
                    else:
                        cells = [result["error"], "", "", f"{flops / 1e9:.1f}", ""]
                    print(f"| {size} | {row['latent']} | {zero} | {variant} | " + " | ".join(cells) + " |", flush=True)
                    results.append(row)
    report = {
        "device": card,
        "torch": torch.__version__,
        "bf16_matmul_peak_flops": peak,
        "batch": args.batch,
        "results": results,
    }
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
