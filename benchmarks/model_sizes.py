"""Parameters and forward GFLOPs per sample of each named UNet size, class-only and with text (the README table).

python benchmarks/model_sizes.py [--resolution 32 64] [--classes 1000] [--context 77 768] [--pooled 768]

FLOPs are counted by torch.utils.flop_counter (2 per multiply-add) on meta tensors, so
nothing is allocated and the count does not depend on the machine. For comparison, DiT
reports 118.6 "Gflops" for DiT-XL/2 at 256 px, counting multiply-adds: 237 GFLOPs here.
The text model is text-only (num_classes = 0) with a CLIP ViT-L/14-like encoder by default:
L = 77 token embeddings of width 768, padding masked, and a pooled vector of width 768. Its
FLOPs include the k, v projections of the context in every cross-attention block but not the
text encoder. Masked SDPA on meta tensors takes the math path, whose matmuls torch counts.
"""

from __future__ import annotations

import argparse

import torch
from flops import FlopCounterMode  # torch's, also counting the CPU flash-attention kernel

from diffusion_dist.models import UNET_SIZES, build_unet


def forward_flops(model: torch.nn.Module, shape: tuple[int, ...], context_length: int = 0) -> int:
    """FLOPs of one forward pass on a batch of one latent of `shape` (C, H, W), with text when the model takes it."""
    z = torch.zeros(1, *shape, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    text = {}
    if model.context_dim:
        text["context"] = torch.zeros(1, context_length, model.context_dim, device="meta")  # (1, L, context_dim)
        text["context_mask"] = torch.ones(1, context_length, dtype=torch.bool, device="meta")  # (1, L)
    if model.pooled_dim:
        text["pooled"] = torch.zeros(1, model.pooled_dim, device="meta")  # (1, pooled_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(z, t, t, **text)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[32, 64], help="latent side(s), 4 channels")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the class-only model")
    parser.add_argument(
        "--context", type=int, nargs=2, default=[77, 768], metavar=("L", "DIM"), help="text tokens and their width"
    )
    parser.add_argument("--pooled", type=int, default=768, help="width of the pooled text vector")
    args = parser.parse_args()
    length, context_dim = args.context

    columns = [f"GFLOPs @ 4×{r}×{r}" for r in args.resolution]
    header = "| size | params | " + " | ".join(columns) + " | params, text | "
    header += " | ".join(f"{c}, text" for c in columns) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in UNET_SIZES:
        cells = []
        for num_classes, text_dims in ((args.classes, (0, 0)), (0, (context_dim, args.pooled))):
            with torch.device("meta"):
                model = build_unet(
                    name, 4, num_classes, learn_sigma=True, context_dim=text_dims[0], pooled_dim=text_dims[1]
                )
            params = sum(p.numel() for p in model.parameters())
            gflops = [forward_flops(model, (4, r, r), length) / 1e9 for r in args.resolution]
            cells += [f"{params / 1e6:.1f}M"] + [f"{g:.1f}" for g in gflops]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
