"""Networks: the conditional UNet and the noisy-latent classifier in named sizes. Know nothing of ranks or DeepSpeed."""

from .classifier import NoisyClassifier, build_classifier
from .unet import UNET_SIZES, UNet, UNetSize, build_unet

MODEL_KINDS = ("unet", "classifier")

__all__ = ["MODEL_KINDS", "UNET_SIZES", "NoisyClassifier", "UNet", "UNetSize", "build_classifier", "build_unet"]
