"""The conditional UNet: shapes, conditioning, the null token, gradients, determinism."""

import re
from pathlib import Path

import pytest
import torch

from diffusion_dist.models import UNET_SIZES, build_unet
from diffusion_dist.models.unet import AttentionBlock


def randomize_zero_inits(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers make a fresh UNet output 0 whatever its input; give them values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny(learn_sigma: bool = True, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_zero_inits(build_unet("UNet-T", 4, num_classes=10, learn_sigma=learn_sigma, **kwargs))


@pytest.mark.parametrize("size", ["UNet-T", "UNet-S"])
@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shapes(size, resolution, learn_sigma):
    model = build_unet(size, 4, num_classes=10, learn_sigma=learn_sigma).eval()
    z = torch.randn(2, 4, resolution, resolution)
    with torch.no_grad():
        out = model(z, torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == (2, 8 if learn_sigma else 4, resolution, resolution)


def test_label_and_null_token_change_the_output():
    model = tiny().eval()
    z, t = torch.randn(1, 4, 32, 32).expand(3, -1, -1, -1), torch.tensor([500, 500, 500])
    with torch.no_grad():
        out = model(z, t, torch.tensor([0, 1, 10]))  # 10 = num_classes is ∅
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    assert model.null_label == 10
    with pytest.raises(IndexError):
        model(z[:1], t[:1], torch.tensor([11]))


def test_timestep_changes_the_output():
    model = tiny().eval()
    z = torch.randn(1, 4, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(z, torch.tensor([10, 900]), torch.tensor([1, 1]))
    assert not torch.allclose(out[0], out[1])


def test_gradients_reach_every_parameter():
    model = tiny()
    out = model(torch.randn(2, 4, 32, 32), torch.tensor([3, 700]), torch.tensor([2, 10]))
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    # Only the class rows in the batch (2 and ∅) receive gradient.
    assert model.class_embed.weight.grad.any(dim=1).nonzero().flatten().tolist() == [2, 10]


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([2, 10])
    grads = []
    for checkpointing in (False, True):
        model = tiny(gradient_checkpointing=checkpointing)
        model(*inputs).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cpu_training_is_bit_identical_across_runs():
    def run() -> list[torch.Tensor]:
        model = tiny()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            z = torch.randn(4, 4, 16, 16, generator=g)
            t, y = torch.randint(0, 1000, (4,), generator=g), torch.randint(0, 11, (4,), generator=g)
            model(z, t, y).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_attention_matches_the_textbook_formula():
    """ADM's attention: 1×1 convolutions for q, k, v and the output, softmax(qᵀk / √d) per head."""
    torch.manual_seed(0)
    block = randomize_zero_inits(AttentionBlock(64, num_head_channels=16))
    x = torch.randn(2, 64, 4, 4)
    qkv = torch.nn.functional.conv2d(block.norm(x), block.qkv.weight, block.qkv.bias)
    q, k, v = qkv.reshape(2, 3, 4, 16, 16).unbind(1)  # (N, heads, C/heads, HW)
    weights = torch.softmax(q.transpose(-1, -2) @ k / 16**0.5, dim=-1)  # (N, heads, HW, HW)
    out = (v @ weights.transpose(-1, -2)).reshape(2, 64, 4, 4)
    expected = x + torch.nn.functional.conv2d(out, block.proj.weight, block.proj.bias)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_takes_a_fused_kernel_in_either_memory_layout():
    """q, k, v reach SDPA with a contiguous head dimension, so it picks a fused (flash) kernel
    instead of its math fallback, which builds the (H·W)² attention matrix with bmm + softmax."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = randomize_zero_inits(AttentionBlock(64, num_head_channels=16))
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        with Ops() as ops:
            out = block(x.contiguous(memory_format=layout))
            out.square().sum().backward()
        assert any("flash_attention" in name for name in ops.names), sorted(ops.names)
        assert not {name for name in ops.names if "bmm" in name or "softmax" in name}, sorted(ops.names)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model size 'UNet-Q'"):
        build_unet("UNet-Q", 4, 10)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_unet("UNet-T", 4, 10)(torch.randn(1, 4, 7, 7), torch.tensor([0]), torch.tensor([0]))


def test_readme_lists_every_size_with_its_parameter_count():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in UNET_SIZES:
        with torch.device("meta"):
            params = sum(p.numel() for p in build_unet(name, 4, 1000, learn_sigma=True).parameters())
        row = re.search(rf"^\| {re.escape(name)} \|\s*([\d.]+)M", readme, re.M)
        assert row, f"README.md has no table row for {name}"
        assert float(row.group(1)) == pytest.approx(params / 1e6, abs=0.051), name
