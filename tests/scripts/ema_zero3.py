"""Run under torchrun with 2 ranks: the ZeRO-3 EMA (each rank averaging its slices) must equal an EMA
computed the plain way on the gathered full weights after every step."""

import deepspeed
import torch
import torch.distributed as dist

from diffusion_dist.models import build_unet
from diffusion_dist.train.ema import EMA

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank = dist.get_rank()
torch.manual_seed(0)
model = build_unet("UNet-T", 4, 10, learn_sigma=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 2**62}
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
assert all(hasattr(p, "ds_tensor") for p in engine.module.parameters()), "parameters should be partitioned"


def gathered() -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().float().clone() for name, p in params.items()}


ema = EMA(engine.module, decay=0.9, warmup=True)
reference = gathered()
generator = torch.Generator().manual_seed(rank)
for step in range(6):
    z = torch.randn(2, 4, 8, 8, generator=generator)
    t, labels = torch.randint(0, 1000, (2,), generator=generator), torch.randint(0, 11, (2,), generator=generator)
    engine.backward(engine(z, t, labels).square().mean())
    engine.step()
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
