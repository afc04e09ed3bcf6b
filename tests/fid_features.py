"""A small feature network for FID tests: InceptionV3's weights cannot be downloaded here.

`DigitFeatures` is a torch-fidelity FeatureExtractorBase, as launch.evaluate takes with
--feature-extractor tests.fid_features:DigitFeatures; `train_digit_features` fits it to
scikit-learn's digits in a few seconds, so its features and logits mean something (an
untrained network would give an FID that hardly tells samples from noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

SPEC = "tests.fid_features:DigitFeatures"


class DigitFeatures(FeatureExtractorBase):
    """uint8 (B, 3, 8, 8) digits -> "features" (B, 64) and "logits" (B, 10)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs) -> None:
        super().__init__(name, features_list)
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(64, 10)
        if feature_extractor_weights_path:
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "features", "isc": "logits"}[metric]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.embed(images)
        outputs = {"features": features, "logits": self.head(features)}
        return tuple(outputs[name] for name in self.features_list)


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as uint8 (N, 3, 8, 8), as data_tools.make_digits writes them, and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return torch.from_numpy(np.repeat(gray[:, None], 3, axis=1)), torch.from_numpy(digits.target)


def train_digit_features(path: Path) -> Path:
    """Fit DigitFeatures to classify the digits (about 99% train accuracy) and save its state dict at `path`."""
    images, labels = digit_images()
    net = DigitFeatures("digits", ["features"])
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = torch.randint(0, len(images), (128,), generator=generator)
        loss = F.cross_entropy(net.head(net.embed(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(net.state_dict(), path)
    return path
