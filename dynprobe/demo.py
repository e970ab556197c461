"""``dynprobe demo``: a small, complete experiment on MNIST-1D that runs on a laptop CPU.

A 1-D CNN with BatchNorm is trained with SGD + momentum (the learning rate divided by 10 at steps 500 and 1,000) on
MNIST-1D (generated offline by the ``mnist1d``
package), with a :class:`dynprobe.Probe` attached by the two documented lines. The run directory is written to
``--out`` and summarized in the terminal.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from dynprobe.config import Barriers, Ghosts, KernelConfig
from dynprobe.ghosts.perturbation import Perturbation
from dynprobe.probe import Probe
from dynprobe.recipes.mnist1d import Conv1dNet, load_mnist1d
from dynprobe.schedule import Schedule, every, log_spaced

__all__ = ["DEMO_MILESTONES", "DEMO_SPAWNS", "DemoConfig", "demo_ghost_steps", "demo_schedule", "run_demo",
           "unused_run_dir"]


# Spawn steps of the demo's ghosts, in order of use (``--ghosts N`` takes the first N below the run's end). They do
# not depend on the run's length: the same run extended to more steps spawns the same ghosts.
DEMO_SPAWNS = (0, 25, 80, 250, 500, 800, 1200, 2000)
# The learning rate is divided by 10 at these steps, as the two-phase paper's recipe divides it at epochs 80 and 120.
DEMO_MILESTONES = (500, 1000)
KERNEL_LAG = 100  # steps: the lag of the kernel velocity S(t, t + Δ)
_REALIZED_NORM_WARNING = r"dynprobe: ghosts? [\d, ]+ \(spawned at step \d+\): .*rounding"


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines the demo run (deterministic for a given seed on a given machine).

    The configuration was chosen so that what the demo shows holds when the same run is extended to twice its
    steps: with a constant learning rate of 0.1 (or 0.05, or 0.1/√(1 + t/100)) this small network stays chaotic for
    at least 3,000 steps — a ghost spawned at step 2,000 still grows 10⁴–10⁷-fold within 800 steps — so ghosts
    spawned "late" only look stable when the run stops before they diverge. With the learning rate divided by 10
    at steps 500 and 1,000, ghosts spawned at step 500 or later grow at most ~5·10³-fold over 800 steps at any
    horizon (seeds 0–2), while those spawned at 250 or earlier grow ≥ 7·10⁶-fold within 400 steps.
    """

    out: Path = Path("runs/demo")
    steps: int = 1500
    seed: int = 0
    width: int = 32
    lr: float = 0.1
    milestones: tuple[int, ...] = DEMO_MILESTONES
    momentum: float = 0.9
    batch_size: int = 128
    num_samples: int = 5000
    ghosts: int = 6
    kernel_n: int = 96
    threads: int | None = None


def demo_schedule(steps: int) -> Schedule:
    """Dense log-spaced snapshots for the first 300 steps, then every 100 (35 snapshots for 1,500 steps)."""
    return log_spaced(min(300, steps), per_decade=8) | every(100)


def demo_ghost_steps(steps: int, count: int) -> list[int]:
    """The first ``count`` of :data:`DEMO_SPAWNS` before step ``steps`` — 0, 25, 80, 250, 500, 800 by default:
    both sides of the transition, independent of the run's length."""
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
    model = Conv1dNet(width=config.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.milestones), gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    console.print(
        f"[bold]dynprobe demo[/bold]: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params) "
        f"on MNIST-1D ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), SGD lr={config.lr} "
        f"(÷10 at steps {', '.join(map(str, config.milestones))}) momentum={config.momentum}, batch "
        f"{config.batch_size}, {config.steps} steps → {out}"
    )

    # The two lines a user adds to their own loop:
    ghost_steps = demo_ghost_steps(config.steps, config.ghosts)
    ghosts = Ghosts(at=ghost_steps, perturbation=Perturbation(norm=1e-7, kind="l2"), control=True,
                    kernel_every_snapshots=4) if ghost_steps else None
    # The kernel velocity S(t, t + 100): every kernel snapshot gets a companion 100 steps later (the late grid
    # already has one), so the velocity is measured on a fixed lag whatever the snapshot spacing.
    kernel = KernelConfig(n=config.kernel_n, seed=config.seed, lag_steps=KERNEL_LAG) if config.kernel_n else None
    with warnings.catch_warnings():
        # A 1e-7 perturbation only partly survives float32 rounding; the run records the realized norm and the
        # report shows it, so the demo does not interrupt its progress bar with that warning.
        warnings.filterwarnings("ignore", message=_REALIZED_NORM_WARNING)
        probe = Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=out,
                      schedule=demo_schedule(config.steps), seed=config.seed, kernel=kernel, ghosts=ghosts,
                      barriers=Barriers(alphas=11, every_snapshots=4), total_steps=config.steps)
    criterion = probe.watch(criterion)

    generator = torch.Generator().manual_seed(config.seed)
    n = data.x_train.shape[0]
    with _progress(console) as progress, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REALIZED_NORM_WARNING)
        task = progress.add_task("training", total=config.steps, loss=float("nan"))
        step = 0
        while step < config.steps:
            for index in torch.randperm(n, generator=generator).split(config.batch_size):
                if step == config.steps:
                    break
                loss = criterion(model(data.x_train[index]), data.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if step % 25 == 0 or step == config.steps:
                    progress.update(task, completed=step, loss=loss.item())
    probe.close()
    console.print(f"trained and probed in {time.perf_counter() - started:.1f} s")
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
