"""The two-phase paper's CIFAR-10 setup as a recipe: data, models, optimizer, schedule, deterministic settings.

The paper (§3, "Main Experimental Setup") trains VGG-16 and ResNet-20 on CIFAR-10 with random crops (32,
padding 4) and horizontal flips, SGD with momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by 10 at
epochs 80 and 120, 160 epochs; batch 128 (the author's code; 391 iterations per epoch). Every phenomenon it
reports sits in the first ~10⁴ iterations (ResNet-20's transition at ~100–500, VGG-16's at ~2,500; cone
references τ ∈ {2000, 4000, 6000, 8000}; switching horizon T = 10⁴), so the default snapshot schedule is dense
there.

Ghost perturbations of norm 1e-7 are at the level of floating-point nondeterminism: :func:`make_deterministic`
must run before CUDA initializes (it sets ``CUBLAS_WORKSPACE_CONFIG``), or the experiment measures the GPU's
nondeterminism instead of ε.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe.config import Ghosts, KernelConfig, Perturbation
from dynprobe.probe import Probe
from dynprobe.schedule import Schedule, every

from .models import resnet20, vgg16_bn

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "PaperRecipe", "cifar10_loaders", "make_deterministic", "paper_model",
           "paper_optimizer", "paper_schedule"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)  # the values of the author's code (and of many CIFAR repos)


def make_deterministic(seed: int) -> None:
    """Seed python, numpy and torch; deterministic kernels (cuDNN, cuBLAS) and no TF32.

    Call it first thing in a script: ``CUBLAS_WORKSPACE_CONFIG`` only takes effect before CUDA initializes.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def paper_model(name: str, num_classes: int = 10) -> nn.Module:
    """``"resnet20"`` (He et al. 2016, option-A shortcuts) or ``"vgg16_bn"`` (the author's VGG-16 with BatchNorm)."""
    builders = {"resnet20": resnet20, "vgg16_bn": vgg16_bn}
    if name not in builders:
        raise ValueError(f"model must be one of {sorted(builders)}; got {name!r}")
    return builders[name](num_classes=num_classes)


def paper_optimizer(model: nn.Module, iterations_per_epoch: int, *, lr: float = 0.1, momentum: float = 0.9,
                    weight_decay: float = 1e-4, milestones_epochs: tuple[int, ...] = (80, 120)
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum 0.9, coupled weight decay 1e-4), lr 0.1 ÷ 10 at epochs 80 and 120; the scheduler is stepped
    once per *iteration* (milestones converted to iterations)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    milestones = [m * iterations_per_epoch for m in milestones_epochs]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def paper_schedule() -> Schedule:
    """Snapshots every 25 iterations to 1,000, every 100 to 10,000, then every 1,000 (≈ 180 for 160 epochs)."""
    return every(25, stop=1000) | every(100, stop=10_000) | every(1000)


def cifar10_loaders(root: str | Path | None, *, batch_size: int = 128, seed: int = 0, num_workers: int = 2,
                    download: bool = False, fake_size: int | None = None
                    ) -> tuple[torch.utils.data.DataLoader, Any]:
    """Training loader (crop + flip, shuffled by a seeded generator) and the test set (normalized only).

    ``fake_size``: use ``torchvision.datasets.FakeData`` of that many images instead of CIFAR-10 (tests, CI:
    nothing is downloaded). Otherwise ``root`` must hold CIFAR-10 (or pass ``download=True``).
    """
    import torchvision
    from torchvision import transforms

    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                          transforms.ToTensor(), normalize])
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    if fake_size is not None:
        train = torchvision.datasets.FakeData(fake_size, (3, 32, 32), 10, transform=train_transform)
        test = torchvision.datasets.FakeData(max(fake_size // 4, 32), (3, 32, 32), 10, transform=test_transform,
                                             random_offset=10**6)
    else:
        if root is None:
            raise ValueError("pass the CIFAR-10 directory (root=...), or fake_size= for synthetic data")
        train = torchvision.datasets.CIFAR10(root, train=True, transform=train_transform, download=download)
        test = torchvision.datasets.CIFAR10(root, train=False, transform=test_transform, download=download)
    generator = torch.Generator().manual_seed(seed)

    def seed_worker(worker_id: int) -> None:  # numpy/random in workers follow torch's per-worker seed
        worker_seed = torch.initial_seed() % 2**32
        np.random.seed(worker_seed)
        random.seed(worker_seed)

    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator,
                                         num_workers=num_workers, worker_init_fn=seed_worker, drop_last=False,
                                         persistent_workers=num_workers > 0)
    return loader, test


@dataclass
class PaperRecipe:
    """Everything that defines one paper-style run; :meth:`run` trains it with a probe attached."""

    model: str = "resnet20"
    out: Path = Path("runs/cifar10-resnet20")
    data: Path | None = None
    download: bool = False
    fake_size: int | None = None
    epochs: int = 160
    max_iterations: int | None = None
    batch_size: int = 128
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    num_workers: int = 2
    ghost_steps: tuple[int, ...] | None = None
    kernel_n: int = 128
    eval_max: int = 2000
    probe_options: dict[str, Any] = field(default_factory=dict)

    def default_ghost_steps(self) -> tuple[int, ...]:
        # Around each architecture's transition (paper Fig. 3): ResNet-20 ~100-500, VGG-16 ~2,500 iterations.
        if self.model == "vgg16_bn":
            return (0, 500, 1000, 2500, 5000, 7500)
        return (0, 100, 250, 500, 1000, 2500, 5000)

    def run(self) -> Path:
        """Train with the probe attached; returns the run directory."""
        make_deterministic(self.seed)
        loader, test = cifar10_loaders(self.data, batch_size=self.batch_size, seed=self.seed,
                                       num_workers=self.num_workers, download=self.download,
                                       fake_size=self.fake_size)
        device = torch.device(self.device)
        model = paper_model(self.model).to(device)
        optimizer, scheduler = paper_optimizer(model, len(loader))
        total = self.epochs * len(loader)
        if self.max_iterations is not None:
            total = min(total, self.max_iterations)
        ghost_steps = tuple(t for t in (self.ghost_steps or self.default_ghost_steps()) if t <= total)
        test_loader = torch.utils.data.DataLoader(test, batch_size=500, shuffle=False)
        options: dict[str, Any] = {
            "schedule": paper_schedule(),
            "ghosts": Ghosts(at=list(ghost_steps), perturbation=Perturbation(norm=1e-7, kind="l2")) if ghost_steps
            else None,
            "kernel": KernelConfig(n=self.kernel_n),
            "eval_max": self.eval_max,
            "total_steps": total,
            **self.probe_options,
        }
        probe = Probe(model, optimizer, eval_data=test_loader, out=self.out, **options)
        criterion = probe.watch(nn.CrossEntropyLoss())
        step = 0
        while step < total:
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = criterion(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if step == total:
                    break
        probe.close()
        return Path(probe.out)
