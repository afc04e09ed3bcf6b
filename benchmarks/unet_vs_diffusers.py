"""Training-step time and FLOPs of our UNet against diffusers' UNet2DModel of matched size, in one run.

python benchmarks/unet_vs_diffusers.py [--size UNet-S] [--resolution 32] [--batch 8] [--rounds 5]

Both are class-conditional ε-models with learned variance (out = 2 × 4 channels) on 4×R×R
latents: ours at a named size; diffusers' with the same widths, blocks per level, attention
resolutions and head size (AdaGN "scale_shift" residual blocks, class embedding), which lands
within a few percent of our parameter count. A step is forward + MSE + backward + AdamW, fp32,
on the CPU; the two models alternate for --rounds rounds after a warm-up, and the figure is the
ratio of median step times (ours / diffusers) and the same ratio per FLOP. Target: <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from flops import FlopCounterMode  # torch's, also counting the CPU flash-attention kernel

sys.path.insert(0, str(Path(__file__).parents[1]))
from diffusion_dist.models import UNET_SIZES, build_unet  # noqa: E402


def diffusers_twin(size_name: str, resolution: int, num_classes: int) -> torch.nn.Module:
    """diffusers' UNet2DModel with our size's widths, depth, attention levels and head size."""
    from diffusers import UNet2DModel

    size = UNET_SIZES[size_name]
    widths = tuple(size.model_channels * m for m in size.channel_mult)
    attention = [2**level in size.attention_ds for level in range(len(widths))]
    return UNet2DModel(
        sample_size=resolution,
        in_channels=4,
        out_channels=8,
        block_out_channels=widths,
        layers_per_block=size.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=size.num_head_channels,
        norm_num_groups=32,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=num_classes + 1,
    )


def step_flops(step, batch: int) -> float:
    """FLOPs of one training step (forward and backward; the optimizer's are negligible) per sample."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def make_step(model: torch.nn.Module, forward, batch: int, resolution: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, resolution, resolution, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    target = torch.randn(batch, 8, resolution, resolution, generator=generator)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(forward(model, z, t, labels), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="UNet-S", choices=list(UNET_SIZES))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of --steps steps each")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = build_unet(args.size, 4, 1000, learn_sigma=True)
    theirs = diffusers_twin(args.size, args.resolution, 1000)
    steps = {
        "ours": make_step(ours, lambda m, z, t, y: m(z, t, y), args.batch, args.resolution),
        "diffusers": make_step(theirs, lambda m, z, t, y: m(z, t, class_labels=y).sample, args.batch, args.resolution),
    }
    params = {
        "ours": sum(p.numel() for p in ours.parameters()),
        "diffusers": sum(p.numel() for p in theirs.parameters()),
    }
    flops = {name: step_flops(step, args.batch) for name, step in steps.items()}  # also the warm-up step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - started) / args.steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["ours"] / median["diffusers"]
    per_flop = ratio / (flops["ours"] / flops["diffusers"])

    print(f"{args.size} vs diffusers UNet2DModel, 4×{args.resolution}×{args.resolution}, batch {args.batch}, fp32 CPU")
    print("| model | params | train GFLOPs / sample | step time (median) | rounds |")
    print("|---|---|---|---|---|")
    for name in steps:
        rounds = ", ".join(f"{v * 1000:.0f}" for v in times[name])
        cells = [
            name,
            f"{params[name] / 1e6:.2f}M",
            f"{flops[name] / 1e9:.2f}",
            f"{median[name] * 1000:.0f} ms",
            rounds,
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"time ratio ours / diffusers: {ratio:.3f}; per FLOP: {per_flop:.3f} (target <= 1.0)")
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "params": params,
                "train_gflops_per_sample": {k: v / 1e9 for k, v in flops.items()},
                "step_time_s": median,
                "time_ratio": ratio,
                "time_ratio_per_flop": per_flop,
            }
        )
    )


if __name__ == "__main__":
    main()
