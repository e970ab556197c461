"""``dynprobe demo``: a small, complete experiment on MNIST-1D that runs on a laptop CPU.

A ReLU MLP is trained with SGD + momentum at a **constant** learning rate on MNIST-1D (generated offline by the
``mnist1d`` package), with a :class:`dynprobe.Probe` attached by the two documented lines and three
perturbation directions per ghost spawn. The run directory is written to ``--out`` and summarized in the terminal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from dynprobe.config import Barriers, Ghosts, KernelConfig
from dynprobe.ghosts.perturbation import Perturbation
from dynprobe.probe import Probe
from dynprobe.recipes.mnist1d import MLP, epoch_batches, load_mnist1d
from dynprobe.schedule import Schedule, every, log_spaced

__all__ = ["DEMO_DURATION", "DEMO_SPAWNS", "DemoConfig", "demo_ghost_steps",
           "demo_schedule", "run_demo", "unused_run_dir"]


# Spawn steps of the demo's ghosts, in order of use (``--ghosts N`` takes the first N below the run's end). They do
# not depend on the run's length: the same run extended to more steps spawns the same ghosts.
DEMO_SPAWNS = (0, 25, 50, 100, 200, 400, 600, 800, 1000)
KERNEL_LAG = 100  # steps: the lag of the kernel velocity S(t, t + Δ)
# What the demo costs, in the words `dynprobe demo --help` and the README both use: 54 s of CPU time (user + sys,
# `/usr/bin/time -v dynprobe demo`, report included) on the 2-core development machine; one torch thread, so the
# wall clock on an idle core is about that, and proportionally longer on a shared machine.
DEMO_DURATION = "about a minute of CPU time"


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines the demo run (deterministic for a given seed on a given machine).

    The defaults are ``tests/science/settings.py``'s ``mlp_sgdm`` exactly (MLP 40-128-128-10 without normalisation,
    SGD with momentum 0.9 at a constant lr 0.1, batch 128, 3,200 training examples, the data order of
    :func:`dynprobe.recipes.mnist1d.epoch_batches`), whose transition independent lock-step ground truth locates
    under the constant learning rate; the demo's own verdict is checked at its horizon and at twice it, with thinned
    curves, on seeds 0–2 (``tests/science/test_demo.py``).
    """

    out: Path = Path("runs/demo")
    steps: int = 2000
    seed: int = 0
    width: int = 128
    depth: int = 2
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 128
    num_samples: int = 4000
    ghosts: int = len(DEMO_SPAWNS)
    directions: int = 3
    kernel_n: int = 96
    threads: int | None = 1  # one thread: the same float summation order, so the same run, on every machine


def demo_schedule(steps: int) -> Schedule:
    """Log-spaced snapshots for the first 200 steps, then every 200 (21 snapshots for 2,000 steps, plus the kernel
    velocity's companions 100 steps after each kernel snapshot)."""
    return log_spaced(min(200, steps), per_decade=4) | every(200)


def demo_ghost_steps(steps: int, count: int) -> list[int]:
    """The first ``count`` of :data:`DEMO_SPAWNS` before step ``steps`` — 0, 25, 50, 100, 200, 400, 600 by
    default: both sides of the transition, independent of the run's length."""
    if count < 0:
        raise ValueError(f"the number of ghosts must be >= 0; got {count}")
    return [t for t in DEMO_SPAWNS if t < steps][:count]


def unused_run_dir(base: Path) -> Path:
    """``base`` if it is free, else ``base-2``, ``base-3``, … (the demo never refuses to run twice)."""
    if not base.exists() or not any(base.iterdir()):
        return base
    k = 2
    while (candidate := base.with_name(f"{base.name}-{k}")).exists():
        k += 1
    return candidate


def run_demo(config: DemoConfig = DemoConfig(), console: Console | None = None) -> Path:
    """Train the demo model with a probe attached; returns the run directory."""
    console = console or Console()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = unused_run_dir(Path(config.out))
    started = time.perf_counter()
    data = load_mnist1d(config.num_samples)
    torch.manual_seed(config.seed)
    model = MLP(width=config.width, depth=config.depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    criterion = nn.CrossEntropyLoss()
    console.print(
        f"[bold]dynprobe demo[/bold]: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params) "
        f"on MNIST-1D ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), SGD at a constant lr={config.lr} "
        f"momentum={config.momentum}, batch "
        f"{config.batch_size}, {config.steps} steps → {out}"
    )

    # The two lines a user adds to their own loop:
    ghost_steps = demo_ghost_steps(config.steps, config.ghosts)
    ghosts = Ghosts(at=ghost_steps, directions=config.directions, perturbation=Perturbation(norm=1e-7, kind="l2"),
                    control=True, kernel_every_snapshots=8) if ghost_steps else None
    # The kernel velocity S(t, t + 100): every kernel snapshot gets a companion 100 steps later (the late grid
    # already has one), so the velocity is measured on a fixed lag whatever the snapshot spacing.
    kernel = KernelConfig(n=config.kernel_n, seed=config.seed, lag_steps=KERNEL_LAG) if config.kernel_n else None
    # 1e-7 keeps 43–67 % of its norm on 6–13 % of the coordinates here: above the rounding warning's thresholds
    probe = Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out,
                  schedule=demo_schedule(config.steps), seed=config.seed, kernel=kernel, ghosts=ghosts,
                  barriers=Barriers(alphas=7, every_snapshots=8), total_steps=config.steps)
    criterion = probe.watch(criterion)

    n = data.x_train.shape[0]
    with _progress(console) as progress:
        task = progress.add_task("training", total=config.steps, loss=float("nan"))
        step, epoch = 0, 0
        while step < config.steps:
            for index in epoch_batches(n, config.batch_size, config.seed, epoch):
                if step == config.steps:
                    break
                loss = criterion(model(data.x_train[index]), data.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step % 25 == 0 or step == config.steps:
                    progress.update(task, completed=step, loss=loss.item())
            epoch += 1
    probe.close()
    console.print(f"trained and probed in {time.perf_counter() - started:.1f} s")
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
