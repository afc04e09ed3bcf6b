"""Bytes per parameter of model states (weights, gradients, optimizer) per rank under ZeRO 0–3, against DeepSpeed.

torchrun --nproc_per_node 2 benchmarks/zero_memory.py [--size UNet-S] [--accumulation 1] [--precision bf16]

Builds the project's DeepSpeed engine (train/engine.py: torch AdamW, the config's ZeRO stage)
for each stage in turn on the CPU with gloo, trains two optimizer steps so that every state
exists, then during a third step counts the bytes of all live tensors (unique storages, found
by the garbage collector, plus .grad) after each backward, before the optimizer step: the
peak of model states, as the ZeRO paper counts it. Activations are freed by then; DeepSpeed's
communication buckets are set small so they do not blur the figure.

Expected, per rank for N ranks and Ψ parameters. bf16 is torch.autocast over fp32 parameters
(train/engine.py), so fp32 and bf16 hold the same states: 4Ψ weights, 4Ψ gradients, 8Ψ Adam
moments, and what DeepSpeed 0.19 (runtime/zero/stage_1_and_2.py, stage3.py) adds:
  ZeRO-0: 4Ψ + 4Ψ + 8Ψ = 16Ψ.
  ZeRO-1: the module's weights become views of one flat fp32 buffer (4Ψ); the optimizer steps
          its own fp32 clone of this rank's partition (single_partition_of_fp32_groups, 4Ψ/N)
          with Adam moments 8Ψ/N. Gradients: all of them (4Ψ) between micro batches when
          accumulating, so 8Ψ + 12Ψ/N; without accumulation they are reduced at the boundary into
          a 4Ψ/N partition, so 4Ψ + 16Ψ/N.
  ZeRO-2: 4Ψ weights + (4 fp32 clone + 8 Adam + 4 gradient partition)Ψ/N = 4Ψ + 16Ψ/N.
  ZeRO-3: (4 weight partition + 4 fp32 clone + 8 Adam + 4 gradient partition)Ψ/N = 20Ψ/N. Under
          autocast stage3.py means to reuse the fp32 weight partition as the master copy, but its
          test compares tensor.device with a device name string, which is never equal, so it
          clones (16Ψ/N if it did not).
The paper's mixed-precision figures (Rajbhandari et al. 2020, Fig. 1: 16Ψ, 4Ψ + 12Ψ/N,
2Ψ + 14Ψ/N, 16Ψ/N) assume 2-byte weights and gradients; they are printed beside. Target: within
10% of the expected figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from diffusion_dist.config import load_config  # noqa: E402
from diffusion_dist.distributed import init_process_group, process_from_env  # noqa: E402
from diffusion_dist.models import UNET_SIZES, build_unet  # noqa: E402
from diffusion_dist.train.engine import Engine  # noqa: E402

SMALL_BUCKETS = {  # elements; DeepSpeed's defaults (5e8) would dwarf a small model
    "reduce_bucket_size": 200_000,
    "allgather_bucket_size": 200_000,
    "stage3_prefetch_bucket_size": 200_000,
    "stage3_max_live_parameters": 200_000,
    "stage3_param_persistence_threshold": 0,
}


def expected_bytes_per_param(stage: int, ranks: int, accumulation: int) -> tuple[str, float]:
    """(formula, bytes per parameter) of model states DeepSpeed holds per rank (the docstring derives them)."""
    if stage == 1 and accumulation > 1:
        return f"8Ψ + 12Ψ/{ranks}", 8 + 12 / ranks
    return {
        0: ("16Ψ", 16.0),
        1: (f"4Ψ + 16Ψ/{ranks}", 4 + 16 / ranks),
        2: (f"4Ψ + 16Ψ/{ranks}", 4 + 16 / ranks),
        3: (f"20Ψ/{ranks}", 20 / ranks),
    }[stage]


def paper_bytes_per_param(stage: int, ranks: int) -> float:
    """The ZeRO paper's mixed-precision Adam figure (2-byte weights and gradients)."""
    return {0: 16.0, 1: 4 + 12 / ranks, 2: 2 + 14 / ranks, 3: 16 / ranks}[stage]


def live_tensor_bytes(extra: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages of all tensors the garbage collector sees, plus `extra`."""
    seen, total = set(), 0
    for tensor in [o for o in gc.get_objects() if torch.is_tensor(o)] + extra:
        storage = tensor.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def measure(stage: int, args: argparse.Namespace, world_size: int) -> tuple[int, float]:
    """(Ψ, peak model-state bytes per parameter on this rank) for one ZeRO stage."""
    overrides = [
        f"train.zero_stage={stage}",
        f"train.precision={args.precision}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * args.accumulation * world_size}",
    ]
    config = load_config(None, overrides, world_size=world_size)
    config.train.deepspeed = {"zero_optimization": SMALL_BUCKETS}
    gc.collect()
    baseline = live_tensor_bytes([])
    torch.manual_seed(0)
    model = build_unet(args.size, 4, 1000, learn_sigma=True)
    psi = sum(p.numel() for p in model.parameters())
    engine = Engine(model, config, world_size, torch.device("cpu"))
    z = torch.randn(args.micro_batch, 4, args.resolution, args.resolution)
    t = torch.zeros(args.micro_batch, dtype=torch.long)
    peak = 0
    for step in range(3):
        for _ in range(args.accumulation):
            out = engine(z.to(engine.input_dtype), t, t)
            engine.backward(out.float().pow(2).mean())
            del out
            if step == 2:
                gc.collect()
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                peak = max(peak, live_tensor_bytes(grads) - baseline)
        engine.step()
    del engine, model
    gc.collect()
    return psi, peak / psi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="UNet-S", choices=list(UNET_SIZES))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--accumulation", type=int, default=1, help="micro batches per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    process = process_from_env()
    init_process_group(process, torch.device("cpu"))
    rows = []
    n = process.world_size
    for stage in range(4):
        psi, measured = measure(stage, args, n)
        totals = [None] * n
        dist.all_gather_object(totals, measured)
        formula, expected = expected_bytes_per_param(stage, n, args.accumulation)
        rows.append(
            {
                "stage": stage,
                "bytes_per_param": max(totals),
                "expected": expected,
                "formula": formula,
                "paper": paper_bytes_per_param(stage, n),
                "psi": psi,
            }
        )
    if process.rank == 0:
        psi = rows[0]["psi"] / 1e6
        print(f"{args.size} (Ψ = {psi:.2f}M), {args.precision}, {n} ranks, accumulation {args.accumulation}")
        print("| ZeRO stage | bytes/param per rank (max over ranks) | expected | measured / expected | paper |")
        print("|---|---|---|---|---|")
        for row in rows:
            ratio = row["bytes_per_param"] / row["expected"]
            print(
                f"| {row['stage']} | {row['bytes_per_param']:.2f} | {row['formula']} = {row['expected']:.2f} "
                f"| {ratio:.3f} | {row['paper']:.2f} |"
            )
        print(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "ranks": n, "rows": rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
