"""The DeepSpeed wrapper in-process on one CPU rank: the DeepSpeed JSON, autocast over fp32 parameters,
gradient clipping against its closed form, and skipped non-finite steps."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_dist.config import load_config
from diffusion_dist.models import build_unet
from diffusion_dist.train.engine import Engine, clip_gradients, deepspeed_config


def config_of(*overrides: str):
    base = ["model.size=UNet-T", "train.micro_batch_size=2", "train.global_batch_size=2", "train.lr=1e-2"]
    return load_config(None, [*base, *overrides])


def test_deepspeed_config_follows_the_precision_and_stage():
    bf16 = deepspeed_config(config_of("train.precision=bf16", "train.zero_stage=2"), 1, "cuda")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in bf16
    assert bf16["zero_optimization"] == {"stage": 2, "overlap_comm": True} and bf16["gradient_clipping"] == 1.0
    assert "overlap_comm" not in deepspeed_config(config_of("train.zero_stage=2"), 1, "cpu")["zero_optimization"]
    fp16 = deepspeed_config(config_of("train.precision=fp16", "train.zero_stage=1"), 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    zero0 = deepspeed_config(config_of("train.precision=fp32", "train.zero_stage=0", "train.grad_clip=0.5"), 1)
    assert zero0["gradient_clipping"] == 0.0 and "torch_autocast" not in zero0  # the engine clips without ZeRO
    merged = deepspeed_config(config_of("train.deepspeed={zero_optimization: {reduce_bucket_size: 1000}}"), 1)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    accumulating = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=16"], world_size=2)
    assert deepspeed_config(accumulating, 2)["gradient_accumulation_steps"] == 4


def test_clip_gradients_matches_the_closed_form():
    weights = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    module = torch.nn.ParameterList(weights)
    weights[0].grad, weights[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0)
    norm = clip_gradients(module, max_norm=0.0)  # 0: measure only
    assert norm.item() == pytest.approx(5.0) and weights[0].grad[0] == 3.0  # sqrt(3² + 4·2²) = 5
    norm = clip_gradients(module, max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    clipped = math.sqrt(sum(w.grad.square().sum().item() for w in weights))
    assert clipped == pytest.approx(1.0, rel=1e-5) and weights[1].grad[0, 0].item() == pytest.approx(0.4, rel=1e-5)
    assert clip_gradients(module, max_norm=10.0).item() == pytest.approx(1.0, rel=1e-5)  # below: left alone
    weights[0].grad[1] = float("inf")
    assert not torch.isfinite(clip_gradients(module, max_norm=1.0))


@pytest.mark.usefixtures("single_rank_group")
def test_bf16_autocasts_over_fp32_parameters_and_reduces_matmul_gradients_in_bf16():
    torch.manual_seed(0)
    model = build_unet("UNet-T", 4, 10, learn_sigma=True)
    engine = Engine(model, config_of("train.precision=bf16", "train.zero_stage=2"), 1, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    comm = {type(m).__name__: getattr(p, "comm_dtype", None) for m in model.modules() for p in m.parameters(False)}
    assert comm["Conv2d"] == comm["Linear"] == comm["TokenLinear"] == torch.bfloat16  # TokenLinear: a subclass
    assert comm["GroupNorm32"] is None and comm["Embedding"] is None  # reduced in their own fp32
    z = torch.randn(2, 4, 8, 8)
    out = engine(z.to(engine.input_dtype), torch.tensor([1, 500]), torch.tensor([3, 10]))
    assert engine.input_dtype == torch.float32 and out.dtype == torch.bfloat16  # the convolution ran in bf16
    engine.backward(out.float().square().mean())
    result = engine.step()
    assert result.applied and torch.isfinite(torch.as_tensor(result.grad_norm))


@pytest.mark.usefixtures("single_rank_group")
def test_a_non_finite_step_leaves_weights_and_optimizer_alone_without_zero():
    torch.manual_seed(0)
    model = build_unet("UNet-T", 4, 10)
    engine = Engine(model, config_of("train.precision=fp32", "train.zero_stage=0"), 1, torch.device("cpu"))
    z, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    engine.backward(engine(z, t, y).square().mean())
    assert engine.step().applied
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.backward(engine(z * float("nan"), t, y).square().mean())
    result = engine.step()
    assert not result.applied and result.grad_norm is None
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="step\\(\\) after 0 backward calls"):
        engine.step()
