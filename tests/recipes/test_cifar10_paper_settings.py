"""The paper's CIFAR-10 settings that need no download (dynprobe.recipes.cifar10): ResNet-20 has the
well-known 269,722 parameters (option-A shortcuts), the learning rate drops ÷10 at epochs 80 and 120 counted in
iterations, and the snapshot schedule is every 25 iterations to 1,000, every 100 to 10,000, then every 1,000."""
from __future__ import annotations

import pytest
import torch

from dynprobe.recipes.cifar10 import paper_model, paper_optimizer, paper_schedule


def test_resnet20_has_the_reference_parameter_count_and_cifar_shaped_outputs():
    model = paper_model("resnet20")
    assert sum(p.numel() for p in model.parameters()) == 269_722  # akamaster/pytorch_resnet_cifar10's count
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert paper_model("resnet20", num_classes=100).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(ValueError, match=r"model must be one of \['resnet20', 'vgg16_bn'\]; got 'resnet18'"):
        paper_model("resnet18")


def test_the_learning_rate_drops_tenfold_at_epochs_80_and_120_counted_in_iterations():
    per_epoch = 3
    optimizer, scheduler = paper_optimizer(torch.nn.Linear(2, 2), per_epoch)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    rates = []
    for _ in range(130 * per_epoch):
        rates.append(group["lr"])
        optimizer.step()
        scheduler.step()  # once per iteration
    expected = [0.1 if i < 80 * per_epoch else 0.01 if i < 120 * per_epoch else 0.001 for i in range(len(rates))]
    assert rates == pytest.approx(expected)


def test_the_snapshot_schedule_is_dense_early_and_sparse_late():
    iterations = 160 * 391  # 160 epochs of CIFAR-10 at batch 128
    expected = set(range(0, 1000, 25)) | set(range(0, 10_000, 100)) | set(range(0, iterations + 1, 1000))
    assert paper_schedule().steps(iterations) == sorted(expected)
    assert len(expected) == 183  # "≈ 180 for 160 epochs"
