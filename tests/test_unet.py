"""The conditional UNet: shapes, class and text conditioning, the null token, gradients, determinism."""

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffusion_dist.models import UNET_SIZES, build_unet
from diffusion_dist.models.unet import AttentionBlock, CrossAttentionBlock


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


CONTEXT_DIM, POOLED_DIM = 16, 12  # a toy text encoder's widths


def tiny_text(num_classes: int = 10, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_unet(
        "UNet-T", 4, num_classes, learn_sigma=True, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM, **kwargs
    )
    return randomize_zero_inits(model)


def text(n: int, length: int = 6, real: tuple[int, ...] | None = None, seed: int = 2) -> dict[str, torch.Tensor]:
    """Token embeddings (n, length, CONTEXT_DIM), a mask with real[i] real tokens then padding, a pooled vector."""
    g = torch.Generator().manual_seed(seed)
    real = real or (length,) * n
    return {
        "context": torch.randn(n, length, CONTEXT_DIM, generator=g),
        "context_mask": torch.arange(length)[None] < torch.tensor(real)[:, None],  # (n, length)
        "pooled": torch.randn(n, POOLED_DIM, generator=g),
    }


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


@pytest.mark.parametrize("with_text", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(with_text):
    inputs = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([2, 10])
    grads = []
    for checkpointing in (False, True):
        model = (tiny_text if with_text else tiny)(gradient_checkpointing=checkpointing)
        cond = text(2, real=(3, 6)) if with_text else {}
        if with_text:
            cond["context"].requires_grad_()  # as for a text encoder trained through the UNet
        model(*inputs, **cond).square().mean().backward()
        grads.append([p.grad for p in model.parameters()] + ([cond["context"].grad] if with_text else []))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if with_text:  # the padded tokens' embeddings get no gradient
        assert grads[1][-1][0, 3:].eq(0).all() and grads[1][-1][0, :3].ne(0).any()


@pytest.mark.parametrize("with_text", [False, True])
def test_cpu_training_is_bit_identical_across_runs(with_text):
    def run() -> list[torch.Tensor]:
        model = tiny_text() if with_text else tiny()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            z = torch.randn(4, 4, 16, 16, generator=g)
            t, y = torch.randint(0, 1000, (4,), generator=g), torch.randint(0, 11, (4,), generator=g)
            cond = text(4, real=(1, 6, 4, 2), seed=step) if with_text else {}
            model(z, t, y, **cond).square().mean().backward()
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


@contextlib.contextmanager
def aten_ops() -> Iterator[set[str]]:
    """Collects the names of the aten ops dispatched inside the block, backward included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        yield ops.names


def assert_fused_attention(names: set[str]) -> None:
    assert any("flash_attention" in name for name in names), sorted(names)
    assert not {name for name in names if "bmm" in name or "softmax" in name}, sorted(names)


def test_attention_takes_a_fused_kernel_in_either_memory_layout():
    """q, k, v reach SDPA with a contiguous head dimension, so it picks a fused (flash) kernel
    instead of its math fallback, which builds the (H·W)² attention matrix with bmm + softmax."""
    torch.manual_seed(0)
    block = randomize_zero_inits(AttentionBlock(64, num_head_channels=16))
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        with aten_ops() as names:
            out = block(x.contiguous(memory_format=layout))
            out.square().sum().backward()
        assert_fused_attention(names)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model size 'UNet-Q'"):
        build_unet("UNet-Q", 4, 10)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_unet("UNet-T", 4, 10)(torch.randn(1, 4, 7, 7), torch.tensor([0]), torch.tensor([0]))


def test_readme_lists_every_size_with_its_parameter_count():
    """Class-only (1000 classes) in column 2; text-only (77 × 768 context, 768 pooled) in column 5."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in UNET_SIZES:
        with torch.device("meta"):
            params = sum(p.numel() for p in build_unet(name, 4, 1000, learn_sigma=True).parameters())
            text_model = build_unet(name, 4, 0, learn_sigma=True, context_dim=768, pooled_dim=768)
            text_params = sum(p.numel() for p in text_model.parameters())
        row = re.search(rf"^\| {re.escape(name)} \|\s*([\d.]+)M \|[^|]*\|[^|]*\|\s*([\d.]+)M \|", readme, re.M)
        assert row, f"README.md has no table row for {name} with a text column"
        assert float(row.group(1)) == pytest.approx(params / 1e6, abs=0.051), name
        assert float(row.group(2)) == pytest.approx(text_params / 1e6, abs=0.051), name


# Text conditioning (issue 18): cross-attention to token embeddings, a pooled vector in the time embedding.


@pytest.mark.parametrize("size", ["UNet-T", "UNet-S"])
@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shapes_with_text(size, resolution, learn_sigma, num_classes):
    """Text alone (num_classes = 0: labels are ∅ = 0) or with class labels."""
    model = build_unet(size, 4, num_classes, learn_sigma, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM).eval()
    z = torch.randn(2, 4, resolution, resolution)
    labels = torch.tensor([3, 10]) if num_classes else torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out = model(z, torch.tensor([0, 999]), labels, **text(2, length=9, real=(2, 9)))
    assert out.shape == (2, 8 if learn_sigma else 4, resolution, resolution) and torch.isfinite(out).all()


def test_padded_tokens_do_not_change_the_output():
    model = tiny_text().eval()
    z, t, y = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.tensor([1, 10])
    cond = text(2, real=(4, 6))
    padded = dict(cond, context=cond["context"].clone())
    padded["context"][0, 4:] = torch.randn(2, CONTEXT_DIM) * 10
    real = dict(cond, context=cond["context"].clone())
    real["context"][0, 1] += 1
    with torch.no_grad():
        out, out_padded, out_real = (model(z, t, y, **c) for c in (cond, padded, real))
        # A 0/1 integer mask (a tokenizer's attention_mask) is the bool mask; no mask means every token is real.
        out_int = model(z, t, y, **dict(cond, context_mask=cond["context_mask"].long()))
        out_unmasked, out_all_real = (
            model(z, t, y, **dict(cond, context_mask=m)) for m in (None, torch.ones(2, 6, dtype=torch.bool))
        )
    assert torch.equal(out, out_padded) and torch.equal(out, out_int) and torch.equal(out_unmasked, out_all_real)
    assert not torch.allclose(out[0], out_real[0]) and torch.equal(out[1], out_real[1])


def test_a_context_without_real_tokens_gives_no_cross_attention_and_no_nan():
    """Impossible for a tokenizer's output (it adds BOS/EOS), but a softmax over no token would be NaN."""
    block = randomize_zero_inits(CrossAttentionBlock(64, CONTEXT_DIM, num_head_channels=32))
    x = torch.randn(2, 64, 4, 4, requires_grad=True)
    context, mask = torch.randn(2, 5, CONTEXT_DIM, requires_grad=True), torch.tensor([[False] * 5, [True] * 5])
    out = block(x, context, mask)
    out.square().sum().backward()
    assert torch.equal(out[0], x[0]) and not torch.allclose(out[1], x[1])
    assert torch.isfinite(x.grad).all() and torch.isfinite(context.grad).all() and context.grad[0].eq(0).all()


def test_cross_attention_matches_the_textbook_formula():
    """softmax(q kᵀ / √d + log m) v per head, padding masked out, then the output projection and the residual."""
    torch.manual_seed(0)
    block = randomize_zero_inits(CrossAttentionBlock(64, CONTEXT_DIM, num_head_channels=16))
    x, context = torch.randn(2, 64, 4, 4), torch.randn(2, 5, CONTEXT_DIM)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    q = torch.nn.functional.conv2d(block.norm(x), block.q.weight, block.q.bias).reshape(2, 4, 16, 16)  # (N, h, d, HW)
    k, v = (context @ block.kv.weight.T).reshape(2, 5, 2, 4, 16).permute(2, 0, 3, 4, 1)  # each (N, h, d, L)
    scores = q.transpose(-1, -2) @ k / 16**0.5 + torch.where(mask, 0.0, -torch.inf)[:, None, None]  # (N, h, HW, L)
    out = (v @ torch.softmax(scores, dim=-1).transpose(-1, -2)).reshape(2, 64, 4, 4)
    expected = x + torch.nn.functional.conv2d(out, block.proj.weight, block.proj.bias)
    torch.testing.assert_close(block(x, context, mask), expected, rtol=1e-5, atol=1e-5)


def test_masked_cross_attention_takes_a_fused_kernel():
    """With its mask, cross-attention still reaches SDPA's fused CPU kernel, not the math fallback."""
    block = randomize_zero_inits(CrossAttentionBlock(64, CONTEXT_DIM, num_head_channels=16))
    x, cond = torch.randn(2, 64, 8, 8, requires_grad=True), text(2, real=(3, 6))
    with aten_ops() as names:
        block(x, cond["context"], cond["context_mask"]).square().sum().backward()
    assert_fused_attention(names)


def test_a_text_model_is_the_class_model_plus_new_modules_that_start_as_the_identity():
    """Every class-model parameter keeps its name; the text modules start at zero, so loading a class
    checkpoint gives the class model exactly, whatever the text; a few optimizer steps make the text count."""
    class_model = tiny()
    torch.manual_seed(0)
    model = build_unet("UNet-T", 4, 10, learn_sigma=True, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM)
    missing, unexpected = model.load_state_dict(class_model.state_dict(), strict=False)
    assert unexpected == [] and missing
    assert all(re.match(r"(down|middle|up)\.(\d+\.)?layers\.1\.cross\.|pooled_embed\.", key) for key in missing), (
        missing
    )
    assert {key.split(".cross.")[0] for key in missing if ".cross." in key} == {
        name for name, m in model.named_modules() if isinstance(m, AttentionBlock)
    }

    z, t, y = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1), torch.tensor([400, 400]), torch.tensor([3, 3])
    cond = text(2)  # two different captions for the same latent
    with torch.no_grad():
        out, reference = model(z, t, y, **cond), class_model(z, t, y)
    assert torch.equal(out, reference)

    # A toy objective that needs the text: ε_θ should be the caption's mean embedding.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = (cond["context"].mean(dim=(1, 2)) + cond["pooled"].mean(dim=1))[:, None, None, None]  # (2, 1, 1, 1)
    for _ in range(3):
        (model(z, t, y, **cond) - target).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        out = model(z, t, y, **cond)
        out_pooled_swapped = model(z, t, y, **dict(cond, pooled=cond["pooled"].flip(0)))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out, out_pooled_swapped)


def test_pooled_vector_changes_the_output():
    for model in (tiny_text(), tiny_text(num_classes=0)):  # with class labels and text alone
        model.eval()
        z, t, y = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1), torch.tensor([9, 9]), torch.tensor([0, 0])
        cond = text(1)
        cond = {"context": cond["context"].expand(2, -1, -1), "pooled": torch.randn(2, POOLED_DIM)}
        with torch.no_grad():
            out = model(z, t, y, **cond)
        assert not torch.allclose(out[0], out[1])
    torch.manual_seed(0)
    pooled_only = randomize_zero_inits(build_unet("UNet-T", 4, 0, pooled_dim=POOLED_DIM)).eval()
    with torch.no_grad():
        out = pooled_only(z, t, y, pooled=cond["pooled"])
    assert not torch.allclose(out[0], out[1])
    assert not any(isinstance(m, CrossAttentionBlock) for m in pooled_only.modules())


def test_text_errors_name_the_problem():
    model, z, t, y = tiny_text(), torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([1, 2])
    cond = text(2)
    cases = [
        (dict(cond, context=None), r"needs context: token embeddings \(N, L, 16\)"),
        (dict(cond, context=cond["context"][..., :8]), r"context must be \(N=2, L>0, 16\), got \(2, 6, 8\)"),
        (dict(cond, context=cond["context"][:1]), r"context must be \(N=2, L>0, 16\), got \(1, 6, 16\)"),
        (dict(cond, context=cond["context"][0]), r"context must be \(N=2, L>0, 16\), got \(6, 16\)"),
        (dict(cond, context=cond["context"][:, :0]), r"got \(2, 0, 16\)"),
        (dict(cond, context_mask=cond["context_mask"][:, :5]), r"context_mask must be \(N, L\) = \(2, 6\)"),
        (dict(cond, context_mask=cond["context_mask"].float()), r"context_mask must be bool or 0/1"),
        (dict(cond, pooled=None), r"needs pooled: a pooled text vector \(N, 12\)"),
        (dict(cond, pooled=cond["pooled"][:, :3]), r"pooled must be \(N=2, 12\), got \(2, 3\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(z, t, y, **kwargs)
    with pytest.raises(ValueError, match=r"no cross-attention \(context_dim=0\) but was given a context"):
        tiny()(z, t, y, context=cond["context"])
    with pytest.raises(ValueError, match=r"no pooled text vector \(pooled_dim=0\) but was given one"):
        tiny()(z, t, y, pooled=cond["pooled"])
    with pytest.raises(ValueError, match="must be >= 0"):
        build_unet("UNet-T", 4, 10, context_dim=-1)
