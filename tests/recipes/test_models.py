"""The paper's CIFAR architectures: shapes, parameter counts (computed independently here), layout, init."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynprobe.recipes.models import resnet20, vgg16_bn


def resnet20_parameter_count(classes: int = 10) -> int:
    """He et al.'s CIFAR ResNet-20 counted by hand: 3×3 convs without bias, BatchNorm γ and β, a linear head."""
    def conv(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out

    def bn(c: int) -> int:
        return 2 * c

    count = conv(3, 16) + bn(16)
    for c_in, c_out in ((16, 16), (16, 32), (32, 64)):
        count += conv(c_in, c_out) + conv(c_out, c_out) + 2 * bn(c_out)  # first block of the stage
        count += 2 * (2 * conv(c_out, c_out) + 2 * bn(c_out))  # two more blocks
    return count + 64 * classes + classes


def vgg16_bn_parameter_count(classes: int = 10) -> int:
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    count, c_in = 0, 3
    for c_out in widths:
        count += 9 * c_in * c_out + c_out + 2 * c_out  # conv with bias, BatchNorm γ, β
        c_in = c_out
    return count + (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * classes + classes)


def test_resnet20_has_the_papers_parameter_count_and_output_shape():
    torch.manual_seed(0)
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == resnet20_parameter_count() == 269_722
    bn_scalars = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert bn_scalars == 1_376
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert resnet20(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sum(p.numel() for p in resnet20(num_classes=100).parameters()) == resnet20_parameter_count(100)


def test_resnet20_state_dict_uses_idelbayevs_names():
    keys = list(resnet20().state_dict())
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer3.2.conv2.weight" in keys and "layer2.0.bn1.running_var" in keys
    assert keys[-2:] == ["linear.weight", "linear.bias"]
    assert not any("shortcut" in key for key in keys)  # option A has no parameters
    assert sum(1 for key in keys if key.endswith("conv1.weight") or key.endswith("conv2.weight")) == 19


def test_resnet20_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = resnet20().layer2[0]
    x = torch.randn(2, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 4, 4)
    assert torch.equal(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(shortcut[:, :8]) == 0 and torch.count_nonzero(shortcut[:, 24:]) == 0


def test_resnet20_uses_kaiming_normal_fan_in_initialization():
    torch.manual_seed(0)
    model = resnet20()
    weight = model.layer3[1].conv1.weight  # 64·9 = 576 fan-in, 36,864 samples
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    assert abs(weight.mean().item()) < 0.01 * weight.std().item() * 10


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return vgg16_bn()


def test_vgg16_bn_has_the_authors_parameter_count_and_output_shape(vgg):
    assert sum(p.numel() for p in vgg.parameters()) == vgg16_bn_parameter_count() == 33_646_666
    vgg.eval()
    with torch.no_grad():
        assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_bn_layout_conv_bias_batchnorm_and_two_dropouts(vgg):
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is not None and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.features) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.features) == 5
    linears = [m for m in vgg.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 4096), (4096, 4096), (4096, 10)]
    assert sum(isinstance(m, nn.Dropout) for m in vgg.classifier) == 2
    assert list(vgg.state_dict())[:2] == ["features.0.weight", "features.0.bias"]
    assert "classifier.6.weight" in vgg.state_dict()


def test_vgg16_bn_uses_the_torchvision_initialization(vgg):
    first, last_conv = vgg.features[0], vgg.features[40]
    assert isinstance(last_conv, nn.Conv2d)
    fan_out = 512 * 9
    assert last_conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert torch.count_nonzero(first.bias) == 0
    assert torch.all(vgg.features[1].weight == 1) and torch.count_nonzero(vgg.features[1].bias) == 0
    assert vgg.classifier[3].weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(vgg.classifier[3].bias) == 0
