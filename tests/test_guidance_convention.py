"""The classifier-free guidance scale is the seed's w everywhere (ε̃ = (1 + w)·ε_c − w·ε_∅), and every
place that states DiT's / diffusers' s says s = 1 + w with numbers that agree (issue 16)."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_dist.config import DiffusionConfig, EvalConfig
from diffusion_dist.diffusion import classifier_free_guidance
from launch import evaluate, sample

ROOT = Path(__file__).resolve().parents[1]
DIT_BEST_FID_S = 1.5  # DiT-XL/2's FID-50K 2.27 used cfg-scale 1.5 (Peebles & Xie 2023, Table 4)


def test_w_is_diffusers_s_minus_one():
    """(1 + w)·ε_c − w·ε_∅ is diffusers' ε_∅ + s·(ε_c − ε_∅) at s = 1 + w."""
    model = lambda z, t, labels: z * (labels.float() + 1).reshape(-1, 1) + t.float().reshape(-1, 1)  # noqa: E731
    z, t, labels = torch.randn(4, 3, dtype=torch.float64), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    cond, uncond = model(z, t, labels), model(z, t, torch.full_like(labels, 5))
    w = 0.5
    torch.testing.assert_close(
        classifier_free_guidance(model, {"labels": labels}, {"labels": torch.full_like(labels, 5)}, w)(z, t),
        uncond + (1 + w) * (cond - uncond),
    )


def test_imagenet_config_uses_dits_best_fid_scale():
    text = (ROOT / "configs" / "imagenet256.yaml").read_text()
    w = yaml.safe_load(text)["diffusion"]["guidance_scale"]
    assert w == pytest.approx(DIT_BEST_FID_S - 1)
    assert "DiT-XL/2" in text
    stated = re.search(r"s = (\d+(?:\.\d+)?), i\.e\. w = (\d+(?:\.\d+)?)", text)
    assert stated, "configs/imagenet256.yaml states DiT's s and the w it sets"
    assert float(stated[1]) == pytest.approx(1 + float(stated[2])) and float(stated[2]) == pytest.approx(w)
    assert EvalConfig().cfg_scale == pytest.approx(DIT_BEST_FID_S - 1)


def test_config_comments_state_the_convention():
    source = (ROOT / "diffusion_dist" / "config.py").read_text()
    for key in ("guidance_scale", "cfg_scale"):
        line = next(line for line in source.splitlines() if re.match(rf"\s+{key}: float = ", line))
        assert "(1 + w)" in line and "s = 1 + w" in line, line
    assert DiffusionConfig().guidance_scale >= 0


def test_readme_states_the_convention_and_the_configs_values():
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("**Guidance scales.**") :].split("\n\n")[0].replace("\n", " ")
    assert "ε̃ = (1 + w)·ε_θ(z_t, c) − w·ε_θ(z_t, ∅)" in paragraph and "s = 1 + w" in paragraph
    stated = re.search(r"DiT-XL/2's best FID \(s = (\d+(?:\.\d+)?)\) is w = (\d+(?:\.\d+)?)", paragraph)
    assert stated and float(stated[1]) == pytest.approx(1 + float(stated[2]))
    assert (
        float(stated[2])
        == yaml.safe_load((ROOT / "configs" / "imagenet256.yaml").read_text())["diffusion"]["guidance_scale"]
    )
    assert float(stated[2]) == EvalConfig().cfg_scale
    # Every DiT s quoted next to a w in the README agrees with s = 1 + w.
    pairs = re.findall(r"w = (\d+(?:\.\d+)?): DiT's s = (\d+(?:\.\d+)?)", readme)
    assert pairs and all(float(s) == pytest.approx(1 + float(w)) for w, s in pairs), pairs


@pytest.mark.parametrize("module", [sample, evaluate])
def test_cfg_scale_help_states_the_convention(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"]) if module is sample else module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    help_of_flag = text[text.index("--cfg-scale CFG_SCALE w of") :][:300]
    assert "ε̃ = (1 + w)·ε_c − w·ε_∅" in help_of_flag and "s = 1 + w" in help_of_flag, help_of_flag
