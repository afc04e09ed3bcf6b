"""Networks: the UNet (class, text or both) and the noisy-latent classifier in named sizes. No ranks, no DeepSpeed."""

from .classifier import NoisyClassifier, build_classifier
from .unet import UNET_SIZES, UNet, UNetSize, build_unet

MODEL_KINDS = ("unet", "classifier")

__all__ = ["MODEL_KINDS", "UNET_SIZES", "NoisyClassifier", "UNet", "UNetSize", "build_classifier", "build_unet"]
