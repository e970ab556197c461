"""MNIST-1D (Greydanus 2020): data generated offline by the ``mnist1d`` package, and the demo's 1-D CNN.

MNIST-1D is a 10-class problem on length-40 signals that is small enough for CPU experiments yet, unlike
MNIST, separates architectures and shows non-trivial training dynamics. ``mnist1d.data.make_dataset``
generates it procedurally from a seed; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLP", "epoch_batches", "MNIST1D", "Conv1dNet", "load_mnist1d"]


@dataclass(frozen=True)
class MNIST1D:
    """The four tensors of an MNIST-1D split; inputs are ``(N, 1, 40)`` float32, labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist1d(num_samples: int = 5000, *, seed: int = 42, train_split: float = 0.8) -> MNIST1D:
    """Generate MNIST-1D offline with the ``mnist1d`` package (install ``dynprobe[demo]``).

    ``seed`` is the dataset-generation seed (42 is the package's canonical dataset); generation takes about a
    second for 5,000 samples and touches neither torch's nor numpy's global RNG.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # pragma: no cover - exercised only without the extra installed
        raise ImportError(
            "MNIST-1D needs the `mnist1d` package: pip install 'dynprobe[demo]' (or pip install mnist1d)"
        ) from error
    import numpy as np

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = int(num_samples), int(seed), float(train_split)
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG; leave the caller's stream alone
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)

    def inputs(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)

    def labels(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.int64)

    return MNIST1D(inputs(data["x"]), labels(data["y"]), inputs(data["x_test"]), labels(data["y_test"]))


class Conv1dNet(nn.Module):
    """Three conv + BatchNorm + ReLU blocks and a linear head: the demo's 1-D CNN (~10k parameters at width 32).

    Shapes: ``(N, 1, 40) → (N, w, 40) → (N, w, 20) → (N, w, 10) → (N, num_classes)``.
    """

    def __init__(self, width: int = 32, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()

        def block(c_in: int, stride: int, kernel: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv1d(c_in, width, kernel, stride=stride, padding=kernel // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
            )

        self.features = nn.Sequential(block(1, 1, 5), block(width, 2, 3), block(width, 2, 3))
        reduced = (length + 3) // 4
        self.head = nn.Linear(width * reduced, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """A ReLU MLP without normalisation, ``40 → width → … → num_classes`` (``depth`` hidden layers): the demo's
    network. Inputs ``(N, 1, 40)`` are flattened."""

    def __init__(self, width: int = 128, depth: int = 2, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = length
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The demo's data order: epoch ``epoch`` is a permutation of the ``n`` training examples drawn from its own
    generator (seed ``seed · 1,000,003 + epoch``), cut into ``n // batch_size`` full batches (the remainder is
    dropped). Step t's batch depends only on (seed, t), so a run extended to more steps sees the same batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return list(order[: n // batch_size * batch_size].split(batch_size))
