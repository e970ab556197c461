"""The two CIFAR-10 architectures of the two-phase paper: ResNet-20 and VGG-16-BN.

Both reproduce the definitions the paper's author trained (``zzp1012/LLFC``, ``src/model``), so parameter
names, shapes, counts and initializations match theirs and checkpoints are interchangeable by ``state_dict``:

* :func:`resnet20`: the CIFAR ResNet-20 of He et al. 2016 (§4.2, "Deep Residual Learning for Image
  Recognition", arXiv:1512.03385) as implemented by Yerlan Idelbayev (``akamaster/pytorch_resnet_cifar10``):
  3×3 stem with 16 channels, three stages of three basic blocks with 16/32/64 channels, **option-A
  shortcuts** (parameter-free: stride-2 subsampling plus zero-padding of the new channels), global average
  pooling and a 64→10 linear head; ``kaiming_normal_`` (fan-in) on every conv and linear weight.
  269,722 parameters, 1,376 of them BatchNorm scalars.
* :func:`vgg16_bn`: the torchvision-style VGG-16 with BatchNorm (Simonyan & Zisserman 2015, configuration
  "D") adapted to 32×32 inputs as in the author's ``cifar_vgg.py``: thirteen 3×3 convs **with bias**, each
  followed by BatchNorm and ReLU, five 2×2 max-pools, a 1×1 adaptive average pool and the full classifier
  512→4096→4096→10 with ReLU and **two Dropout(0.5)** layers; conv weights ``kaiming_normal_`` (fan-out,
  ReLU gain), conv biases 0, BatchNorm γ=1 and β=0, linear weights N(0, 0.01²) and biases 0.
  33,646,666 parameters.

Inputs are ``(N, 3, 32, 32)`` images (normalized with the CIFAR mean/std of the recipes); outputs are
``(N, num_classes)`` logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetCIFAR", "VGG", "resnet20", "vgg16_bn"]


class _OptionAShortcut(nn.Module):
    """He et al.'s option-A shortcut: take every second pixel, zero-pad the new channels (no parameters).

    ``(N, C, H, W) → (N, C + 2·pad, H/2, W/2)`` with ``pad = planes // 4`` on each side of the channel
    dimension. Idelbayev wrote it as a lambda inside a ``LambdaLayer``; a named module pickles and prints.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class _BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _OptionAShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out of place (Idelbayev writes `out += ...`): same values, and friendlier to autograd transforms.
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet of He et al. 2016 with ``6k + 2`` layers (``blocks_per_stage = k``); see :func:`resnet20`."""

    def __init__(self, blocks_per_stage: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)  # Idelbayev's `_weights_init`: fan-in, gain √2

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(_BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.shape[3]).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> ResNetCIFAR:
    """CIFAR ResNet-20 (He et al. 2016, §4.2; Idelbayev's option-A implementation): 269,722 parameters at 10 classes.

    ``(N, 3, 32, 32) → (N, num_classes)``. The paper's ResNet-20 experiments (transition at ~100–500
    iterations) use this network; see the module docstring for the exact layout and initialization.
    """
    return ResNetCIFAR((3, 3, 3), num_classes=num_classes)


_VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """Torchvision-style VGG for 32×32 inputs: ``features`` → 1×1 average pool → ``classifier``; see
    :func:`vgg16_bn`."""

    def __init__(self, config: tuple[int | str, ...] = _VGG16_CONFIG, num_classes: int = 10,
                 batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(in_channels, int(entry), kernel_size=3, padding=1, bias=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(entry)))
            layers.append(nn.ReLU(inplace=False))
            in_channels = int(entry)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(512, 4096), nn.ReLU(inplace=False), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=False), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
        for module in self.modules():  # the author's `_initialize_weights` (torchvision's VGG init)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg16_bn(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm for CIFAR-10, as trained by the paper's author: 33,646,666 parameters at 10 classes.

    ``(N, 3, 32, 32) → (N, num_classes)``; conv bias on, classifier 512→4096→4096→``num_classes`` with two
    Dropout(0.5) layers (so the model must be in eval mode, or its RNG replayed, for reproducible outputs).
    The paper's Fig. 3 (inflection at ~2,500 iterations) uses this network.
    """
    return VGG(_VGG16_CONFIG, num_classes=num_classes, batch_norm=True)
