"""Run under torchrun with 2 ranks: the ZeRO-3 EMA (each rank averaging its slices) must equal an EMA
computed the plain way on the gathered full weights after every step."""

import deepspeed
import torch
import torch.distributed as dist

from diffusion_dist.config import load_config
from diffusion_dist.models import build_unet
from diffusion_dist.train.ema import EMA
from diffusion_dist.train.engine import Engine

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank = dist.get_rank()
torch.manual_seed(0)
model = build_unet("UNet-T", 4, 10, learn_sigma=True)
settings = ["train.zero_stage=3", "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-2"]
config = load_config(None, [*settings, "train.precision=fp32", "train.grad_clip=0"], world_size=2)
engine = Engine(model, config, world_size=2, device=torch.device("cpu"))
assert all(hasattr(p, "ds_tensor") for p in engine.module.parameters()), "parameters should be partitioned"


def gathered() -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().float().clone() for name, p in params.items()}


ema = EMA(engine.local_parameters, decay=0.9, warmup=True, partitioned=engine.partitioned)
reference = gathered()
generator = torch.Generator().manual_seed(rank)
for step in range(6):
    z = torch.randn(2, 4, 8, 8, generator=generator)
    t, labels = torch.randint(0, 1000, (2,), generator=generator), torch.randint(0, 11, (2,), generator=generator)
    engine.backward(engine(z, t, labels).square().mean())
    assert engine.step().applied
    decay = min(0.9, (1 + step) / (10 + step))
    ema.update()
    for name, weight in gathered().items():
        reference[name] = torch.lerp(reference[name], weight, 1 - decay)

full = ema.full_state_dict()
mismatched = [name for name in reference if not torch.equal(full[name], reference[name])]
assert not mismatched, f"EMA differs for {mismatched[:5]}"
assert ema.shadow[0].numel() < reference[ema.names[0]].numel() or len(reference[ema.names[0]]) == 1
if rank == 0:
    print("EMA ZeRO-3 matches the EMA of gathered weights", flush=True)
