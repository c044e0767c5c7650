"""torchvision ResNets as backbones.

``resnet18_cifar``/``resnet34_cifar``/``resnet50_cifar``: CIFAR stem (3×3 conv, stride 1, no
max-pool), as in the GCR/EBV/BCT CIFAR recipes. ``tv_resnet18/34/50``: the ImageNet stem.
The classifier ``fc`` is removed: the method owns the head.
"""

from dataclasses import dataclass

from torch import nn

from ortho_run.config import ModelConfig
from ortho_run.errors import ConfigError
from ortho_run.models.registry import MODELS


@dataclass
class TorchvisionConfig(ModelConfig):
    pretrained: bool = False  # ImageNet weights (tv_* only); needs them in the torch hub cache


def _tv(arch: str, cifar_stem: bool):
    def build(cfg, in_channels, image_size):
        import torchvision

        weights = None
        if getattr(cfg, "pretrained", False):
            if cifar_stem:
                raise ConfigError("model.pretrained=true is only for the tv_* ImageNet models")
            weights = "DEFAULT"
        try:
            m = getattr(torchvision.models, arch)(weights=weights)
        except Exception as exc:  # weights not cached and no network
            raise ConfigError(f"model.pretrained: could not load {arch} weights ({exc}); "
                              f"put them in the torch hub cache or set model.pretrained=false") from None
        if cifar_stem or in_channels != 3:
            stride = 1 if cifar_stem else 2
            m.conv1 = nn.Conv2d(in_channels, 64, 3 if cifar_stem else 7, stride,
                                1 if cifar_stem else 3, bias=False)
        if cifar_stem:
            m.maxpool = nn.Identity()
        dim = m.fc.in_features
        m.fc = nn.Identity()
        return m, dim

    return build


for _arch in ("resnet18", "resnet34", "resnet50"):
    MODELS.register(f"{_arch}_cifar")(_tv(_arch, True))
    MODELS.register(f"tv_{_arch}", schema=TorchvisionConfig)(_tv(_arch, False))
