"""Parameters and forward GFLOPs per sample of each named UNet size (the README table).

python benchmarks/model_sizes.py [--resolution 32 64] [--classes 1000]

FLOPs are counted by torch.utils.flop_counter (2 per multiply-add) on meta tensors, so
nothing is allocated and the count does not depend on the machine. For comparison, DiT
reports 118.6 "Gflops" for DiT-XL/2 at 256 px, counting multiply-adds: 237 GFLOPs here.
"""

from __future__ import annotations

import argparse

import torch
from flops import FlopCounterMode  # torch's, also counting the CPU flash-attention kernel

from diffusion_dist.models import UNET_SIZES, build_unet


def forward_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on a batch of one latent of `shape` (C, H, W)."""
    z = torch.zeros(1, *shape, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(z, t, t)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[32, 64], help="latent side(s), 4 channels")
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()

    header = "| size | params | " + " | ".join(f"GFLOPs @ 4×{r}×{r}" for r in args.resolution) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in UNET_SIZES:
        with torch.device("meta"):
            model = build_unet(name, 4, args.classes, learn_sigma=True)
        params = sum(p.numel() for p in model.parameters())
        gflops = [forward_flops(model, (4, r, r)) / 1e9 for r in args.resolution]
        print(f"| {name} | {params / 1e6:.1f}M | " + " | ".join(f"{g:.1f}" for g in gflops) + " |")


if __name__ == "__main__":
    main()
