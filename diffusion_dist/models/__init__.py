"""Networks: the conditional UNet in named sizes. Knows nothing of ranks or DeepSpeed."""

from .unet import UNET_SIZES, UNet, UNetSize, build_unet

__all__ = ["UNET_SIZES", "UNet", "UNetSize", "build_unet"]
