"""Training throughput of the trainer's step against a plain PyTorch loop, and MFU, per UNet size on one GPU, bf16.

python benchmarks/gpu_throughput.py [--quick] [--sizes UNet-S UNet-B ...] [--resolutions 32 64] [--batch 64]
       [--zero 0 1 2] [--variants eager compile channels_last compile+channels_last] [--steps 20]
       [--warmup 5] [--device cuda:0] [--json results.json]

For each size, latent resolution (4×32×32 is 256 px, 4×64×64 is 512 px) and variant (eager;
train.compile; train.channels_last; both) it times, in the same process and on the same
device-resident random latents and labels:
  plain:   a bare PyTorch loop: the same UNet, the project's loss (DiffusionObjective: learned
           variance, DDPM-IP, label dropout), bf16 autocast around the network, torch AdamW
           (fused on CUDA), clip_grad_norm_ (foreach); torch.compile and NHWC inputs as the variant says;
  trainer: the step train() runs (train/loop.py), for each ZeRO stage: the DeepSpeed Engine,
           objective.loss through the loop's network wrapper, engine.backward and engine.step,
           the EMA update and the metric sums (MetricsLog.add / end_step); no data loading.
Each trainer row shows its ratio to the plain loop of the same variant (eager against eager,
compiled against compiled). The plain loop keeps no EMA: the ratio charges the trainer for its
EMA (one foreach lerp over the fp32 weights per step) as well as for DeepSpeed.

Reported: img/s, step time, peak memory above what was allocated before the configuration,
training FLOPs per sample (forward + backward, torch.utils.flop_counter) and MFU = img/s × FLOPs
per sample / peak, with the peak the card's bf16 matmul rate measured in the same run (a large
bf16 matmul), not the datasheet's. A configuration that does not fit is reported as OOM.

--quick measures the headline rows only (UNet-XL and UNet-B at 4×32×32, batch 64, ZeRO 0/1/2
against the plain loop, eager and compiled; 3 warm-up and 10 timed steps): about 5 minutes on an
H100/H200, most of it torch.compile (about a minute for the first compile of a size). --device cpu
runs the same code as a smoke test with tiny sizes (figures from a CPU mean nothing for GPUs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flops import FlopCounterMode  # torch's, also counting the CPU flash-attention kernel

sys.path.insert(0, str(Path(__file__).parents[1]))
from diffusion_dist.config import Config, load_config  # noqa: E402
from diffusion_dist.distributed import init_process_group, process_from_env  # noqa: E402
from diffusion_dist.models import UNET_SIZES, build_unet  # noqa: E402
from diffusion_dist.objectives import OBJECTIVES  # noqa: E402
from diffusion_dist.train.ema import EMA  # noqa: E402
from diffusion_dist.train.engine import Engine, deepspeed_version  # noqa: E402
from diffusion_dist.train.reporting import MetricsLog  # noqa: E402

VARIANTS = ("eager", "compile", "channels_last", "compile+channels_last")
NUM_CLASSES = 1000
FULL = {
    "sizes": list(UNET_SIZES),
    "resolutions": [32, 64],
    "batch": 64,
    "zero": [0, 2],
    "variants": list(VARIANTS),
    "steps": 20,
    "warmup": 5,
}
# The headline rows, sized for under 6 minutes on one H100/H200: UNet-XL's plain loop runs at
# ~460 img/s eager and ~600 compiled on an H200, so 13 steps of batch 64 take ~2 s a row; the
# rest is building the models and compiling them.
QUICK = {
    "sizes": ["UNet-XL", "UNet-B"],
    "resolutions": [32],
    "batch": 64,
    "zero": [0, 1, 2],
    "variants": ["eager", "compile"],
    "steps": 10,
    "warmup": 3,
}

Step = Callable[[], None]


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
    with device:
        model = build_unet(size, 4, NUM_CLASSES, learn_sigma=True)
        z = torch.randn(1, 4, resolution, resolution)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(z, t, t).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def bench_config(size: str, zero: int, variant: str, batch: int) -> Config:
    return load_config(
        None,
        [
            f"model.size={size}",
            f"model.num_classes={NUM_CLASSES}",
            "train.precision=bf16",
            f"train.zero_stage={zero}",
            f"train.micro_batch_size={batch}",
            f"train.global_batch_size={batch}",
            # The trainer's own switches: torch.compile of the UNet's forward, NHWC activations.
            f"train.compile={'compile' in variant}",
            f"train.channels_last={'channels_last' in variant}",
        ],
    )


def batch_draws(objective, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss's draws for the fixed batch, made per sample as the data loader makes them, on the device."""
    generator = torch.Generator().manual_seed(0)
    drawn = [objective.draw(generator, tuple(latents.shape[1:])) for _ in range(len(latents))]
    return {name: torch.stack([d[name] for d in drawn]).to(latents.device) for name in drawn[0]}


def trainer_step(config: Config, device: torch.device, latents: torch.Tensor, labels: torch.Tensor) -> Step:
    """One optimizer step as train() runs it (train/loop.py), on fixed device-resident latents."""
    objective = OBJECTIVES[config.model.kind].from_config(config)
    with device:  # built on the device only to start faster; the engine would move it there
        model = objective.build(
            config.model.size, latents.shape[1], config.model.num_classes, learn_sigma=objective.diffusion.learn_sigma
        )
    engine = Engine(model, config, 1, device)
    ema = EMA(engine.local_parameters, config.train.ema_decay, config.train.ema_warmup, engine.partitioned)
    metrics = MetricsLog(Path(tempfile.gettempdir()), 0, objective.diffusion.num_timesteps, device)
    layout = torch.channels_last if config.train.channels_last else torch.contiguous_format
    draws = batch_draws(objective, latents)  # in training they come with each batch (data/stream.py)

    def network(z: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        return engine(z.to(engine.input_dtype, memory_format=layout), *conditions).float()

    def step() -> None:
        for _ in range(engine.accumulation):
            terms = objective.loss(network, latents, labels, draws)
            engine.backward(objective.total(terms))
            metrics.add(terms)
        update = engine.step()
        if update.applied:
            ema.update()
        metrics.end_step(update.grad_norm)

    return step


def plain_step(config: Config, device: torch.device, latents: torch.Tensor, labels: torch.Tensor) -> Step:
    """One step of a bare PyTorch loop with the same model, loss and optimizer settings."""
    objective = OBJECTIVES[config.model.kind].from_config(config)
    with device:
        model = objective.build(
            config.model.size, latents.shape[1], config.model.num_classes, learn_sigma=objective.diffusion.learn_sigma
        )
    if config.train.compile:
        model.compile()  # in place, as the engine compiles
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay, fused=device.type == "cuda"
    )
    layout = torch.channels_last if config.train.channels_last else torch.contiguous_format
    draws = batch_draws(objective, latents)

    def network(z: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):  # around the network only, as the engine does
            return model(z.contiguous(memory_format=layout), *conditions).float()

    def step() -> None:
        loss = objective.total(objective.loss(network, latents, labels, draws))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step: Step, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step after `warmup` steps (compilation, autotuning, the allocator's first requests)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def measure(
    build: Callable[..., Step], config: Config, resolution: int, args: argparse.Namespace, device: torch.device
) -> dict:
    """img/s, step time and peak memory of one loop in one configuration, or {"error": ...}."""
    started = time.perf_counter()
    gc.collect()  # the previous configuration's engine (reference cycles) must not count here
    before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    latents = torch.randn(args.batch, 4, resolution, resolution, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    try:
        seconds = time_steps(build(config, device, latents, labels), device, args.steps, args.warmup)
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # noqa: BLE001 - one failing configuration (e.g. a compile error) must not end the sweep
        return {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "img_per_s": args.batch / seconds,
        "step_time_s": seconds,
        "peak_memory_gib": peak,
        "wall_s": time.perf_counter() - started,  # building, compiling and timing: for sizing --quick
    }


def row_cells(row: dict) -> list[str]:
    if "error" in row:
        return [row["error"], "", "", "", f"{row['train_gflops_per_sample']:.1f}", ""]
    ratio = f"{row['ratio']:.3f}" if "ratio" in row else ""
    return [
        f"{row['img_per_s']:.1f}",
        ratio,
        f"{row['step_time_s'] * 1000:.1f}",
        f"{row['peak_memory_gib']:.1f}",
        f"{row['train_gflops_per_sample']:.1f}",
        f"{row['mfu']:.1%}",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the headline rows only (see the module docstring)")
    parser.add_argument("--sizes", nargs="+", choices=list(UNET_SIZES))
    parser.add_argument("--resolutions", nargs="+", type=int, help="latent sides")
    parser.add_argument("--batch", type=int, help="samples per step (one GPU)")
    parser.add_argument(
        "--zero",
        nargs="*",
        type=int,
        choices=[0, 1, 2, 3],
        help="the trainer's ZeRO stages (none: the plain loop only)",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # flags given explicitly win
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    init_process_group(process_from_env(), device)  # DeepSpeed wants a process group, even of one

    started = time.perf_counter()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = matmul_peak(device, n=8192 if device.type == "cuda" else 1024, repeats=20 if device.type == "cuda" else 3)
    print(f"{card}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; batch {args.batch}, {args.steps} steps")
    columns = "size latent loop ZeRO variant img/s trainer/plain step_(ms) peak_mem_(GiB) train_GFLOPs/img MFU"
    print("| " + " | ".join(c.replace("_", " ") for c in columns.split()) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    report = {
        "device": card,
        "torch": torch.__version__,
        "deepspeed": deepspeed_version(),
        "bf16_matmul_peak_flops": peak,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "results": [],
    }
    for size in args.sizes:
        for resolution in args.resolutions:
            # Compiled code is kept across the loops of one size (same graph); a new size or latent
            # side starts afresh, or dynamo would recompile with dynamic shapes.
            torch._dynamo.reset()
            flops = train_flops_per_sample(size, resolution, device)
            for variant in args.variants:
                loops = [("plain", None, plain_step)] + [("trainer", zero, trainer_step) for zero in args.zero]
                plain = None
                for loop, zero, build in loops:
                    config = bench_config(size, zero or 0, variant, args.batch)
                    row = {"size": size, "latent": f"4x{resolution}x{resolution}", "loop": loop, "zero": zero}
                    row.update(variant=variant, train_gflops_per_sample=flops / 1e9)
                    row.update(measure(build, config, resolution, args, device))
                    if "img_per_s" in row:
                        row["mfu"] = row["img_per_s"] * flops / peak
                        if loop == "plain":
                            plain = row["img_per_s"]
                        elif plain:
                            row["ratio"] = row["img_per_s"] / plain
                    stage = "—" if zero is None else str(zero)
                    cells = [size, row["latent"], loop, stage, variant, *row_cells(row)]
                    print("| " + " | ".join(cells) + " |", flush=True)
                    report["results"].append(row)
                    report["wall_s"] = time.perf_counter() - started
                    if args.json:  # after every row: a run stopped at a time limit keeps what it measured
                        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
