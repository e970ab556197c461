"""Shared fixtures: tiny models, generated data and a training loop that draws batches from the global RNG.

The loop samples batch indices with ``torch.randint`` from the *global* generator on purpose: any RNG
disturbance caused by the probe then changes the data order as well, so bitwise comparisons catch it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

# cuBLAS reads this when its first handle is created: set before any CUDA matmul, so that the `device` fixture's
# deterministic mode can hold on a GPU (harmless on the CPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_data(shape: tuple[int, ...] = (20,), *, n_train: int = 256, n_test: int = 96, classes: int = 5,
              seed: int = 0) -> Data:
    """A learnable random classification problem (labels from a random linear teacher)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *shape, generator=generator)
    teacher = torch.randn(x[0].numel(), classes, generator=generator)
    y = (x.flatten(1) @ teacher).argmax(1)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class MLP(nn.Module):
    def __init__(self, d_in: int = 20, width: int = 32, classes: int = 5, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv + BatchNorm + dropout on 3×8×8 images."""

    def __init__(self, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Dropout(0.1),
        )
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def mlp_setup(seed: int = 0):
    """MLP + dropout, SGD with momentum and weight decay (no scheduler)."""
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, None, make_data((20,), seed=seed)


def cnn_setup(seed: int = 0):
    """CNN + BatchNorm, Adam, StepLR."""
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    return model, optimizer, scheduler, make_data((3, 8, 8), seed=seed)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: Data, steps: int, *,
          criterion: Callable | None = None, batch_size: int = 32,
          after_step: Callable[[int], None] | None = None) -> list[bool]:
    """The user's loop: returns the model's ``training`` flag observed after each step."""
    criterion = criterion or nn.CrossEntropyLoss()
    flags = []
    model.train()
    for step in range(steps):
        index = torch.randint(0, data.x_train.shape[0], (batch_size,))
        loss = criterion(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        flags.append(all(m.training for m in model.modules()))
        if after_step is not None:
            after_step(step + 1)
    return flags


def on_device(setup: Callable, device: torch.device) -> Callable:
    """``setup`` with its model and training data moved to ``device`` (the eval data stays on the CPU: the probe
    moves it, as it does for a user's)."""
    if device.type == "cpu":
        return setup

    def moved(*args, **kwargs):
        model, optimizer, scheduler, data = setup(*args, **kwargs)
        model.to(device)  # in place: the optimizer's parameters are the moved ones
        data.x_train, data.y_train = data.x_train.to(device), data.y_train.to(device)
        return model, optimizer, scheduler, data

    return moved


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if not torch.equal(a[key], b[key]):
            difference = (a[key].double() - b[key].double()).abs().max()
            raise AssertionError(f"{key} differs (max abs diff {difference})")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Same thread count in both runs of a bitwise comparison; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """The device a core property is checked on: the CPU, and CUDA where a GPU is present (skipped otherwise).

    On CUDA the test runs with deterministic algorithms (``torch.use_deterministic_algorithms(True)``, cuDNN's
    benchmark off, ``CUBLAS_WORKSPACE_CONFIG`` set above): cuDNN and cuBLAS otherwise choose kernels by timing and
    reduce with atomics, so a replay (the ε = 0 control, a re-run) would not be bitwise exact. TF32 is off.
    """
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, cudnn_tf32 = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    matmul_precision = torch.get_float32_matmul_precision()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    # float32 means float32 (the CPU's arithmetic): TF32 convolutions would move float64 references by ~1e-3
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield torch.device("cuda")
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, cudnn_tf32
        torch.set_float32_matmul_precision(matmul_precision)
