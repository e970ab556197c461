"""Per-step cost of G ghost replicas, sequential vs vectorized, in main-step equivalents.

Run: ``python tests/benchmarks/bench_ghosts.py [--repeats 5] [--rounds 6] [--block 8] [--threads 1] [--ghosts 1 4 8]``

Workloads (batch 128, generated data, nothing downloaded):

* ``mlp``: 40 → 256 → 256 → 10 with ReLU and dropout 0.2, SGD with momentum and weight decay;
* ``cnn``: the demo's 1-D CNN (:class:`dynprobe.recipes.mnist1d.Conv1dNet`, width 32, three conv + BatchNorm
  blocks), Adam.

For each G, a probe runs G ghosts (G = 1: one perturbed ghost; G > 1: the ε = 0 control and G − 1 perturbed
ghosts, spawned at steps 0 … G − 2) with ``Ghosts(vectorize=False)`` (sequential deep copies) and
``vectorize=True`` (one vmap stack of G + 1 rows: the ghosts and the ε = 0 shadow of the main run). ``bare
copies`` is the floor of the sequential path: G hand-made deep copies stepped after the main step on the same
batch and dropout masks, without a probe. Four loops — plain (no probe), bare copies, sequential,
vectorized — are timed once every ghost is alive (no snapshot falls in
the timed window). They take turns in blocks of ``--block`` steps (first step of a block untimed), so that this
machine's speed drift hits them alike while each keeps its own tensors in cache as it would running alone:

    cost(G) = (median probed step − median plain step) / median plain step     [main-step equivalents]

per round; a repeat's cost is the median over its ``--rounds`` rounds. The table shows the median over repeats
with the spread (min–max); ``vec/seq`` is the median over repeats of (1 + vectorized cost) / (1 + sequential
cost), the ratio of the probed step times; ``auto`` is the mode ``Ghosts(vectorize="auto")`` chose for that G
in one more run, by its own dry-run timing. Targets (issue 4): cost ≤ 1.1·G, vectorized < sequential at G ≥ 4.

Separation curves: the probed loops include recording l2(t) = ‖θ' − θ_ref‖₂ after every ghost step. Its own cost is
shown per workload (``separation``): the median time of one separation of a ghost replica from the main model,
against the median time of that replica's training step (replay of the captured batch, optimizer step) on the same
batch, both measured here in alternation.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

import dynprobe
from dynprobe.ghosts.replica import separation, train_replica
from dynprobe.recipes.mnist1d import Conv1dNet

BATCH = 128


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(256, 10))


WORKLOADS = {
    "mlp": (mlp, (40,), lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "cnn": (lambda: Conv1dNet(width=32), (1, 40), lambda params: torch.optim.Adam(params, lr=1e-3)),
}


class Trainer:
    """One training loop (the user's), optionally probed with ``ghosts`` ghosts; :meth:`step` times one step."""

    def __init__(self, workload: str, ghosts: int | None, vectorize: bool | str, *, bare: bool = False) -> None:
        build, shape, make_optimizer = WORKLOADS[workload]
        torch.manual_seed(0)
        self.model = build()
        self.optimizer = make_optimizer(self.model.parameters())
        self.generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(2048, *shape, generator=self.generator)
        self.y = torch.randint(0, 10, (2048,), generator=self.generator)
        self.criterion: nn.Module = nn.CrossEntropyLoss()
        self.probe, self.out, self.ghosts, self.vectorize = None, None, ghosts, vectorize
        self.copies: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        if bare:  # the floor: G hand-made deep copies stepped on the same batch and dropout masks, no probe
            for _ in range(ghosts):
                model = copy.deepcopy(self.model)
                optimizer = copy.deepcopy(self.optimizer, {id(p): q for p, q in
                                                           zip(self.model.parameters(), model.parameters())})
                self.copies.append((model, optimizer))
            ghosts = None
        if ghosts is not None:
            self.out = tempfile.mkdtemp(prefix="bench_ghosts_")
            at = [0] if ghosts == 1 else list(range(ghosts - 1))
            config = dynprobe.Ghosts(at=at, control=ghosts > 1, vectorize=vectorize,
                                     perturbation=dynprobe.Perturbation(norm=1e-5, kind="l2"))
            self.probe = dynprobe.Probe(self.model, self.optimizer, eval_data=(self.x[:128], self.y[:128]),
                                        out=self.out, schedule=[0], ghosts=config, errors="raise",
                                        snapshot_on_close=False)
            self.criterion = self.probe.watch(self.criterion)
        self.model.train()
        for _ in range(3 + ghosts if ghosts else 3):  # every ghost spawned and stepped, first calls done
            self.step()
        if self.probe is not None:  # the benchmark checks its own setup
            ghost_set = self.probe._ghosts  # noqa: SLF001
            assert len(ghost_set.live) == ghosts, f"expected {ghosts} live ghosts, found {len(ghost_set.live)}"
            self.mode = ghost_set.mode
            if vectorize != "auto":
                assert self.mode == ("vectorized" if vectorize else "sequential"), self.mode

    def step(self) -> float:
        index = torch.randint(0, self.x.shape[0], (BATCH,), generator=self.generator)
        started = time.perf_counter()
        rng = torch.get_rng_state()
        x, y = self.x[index], self.y[index]
        loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.copies:
            after = torch.get_rng_state()
            for model, optimizer in self.copies:
                torch.set_rng_state(rng)
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            torch.set_rng_state(after)
        return time.perf_counter() - started

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            shutil.rmtree(self.out, ignore_errors=True)


def costs(workload: str, ghosts: int, rounds: int, block: int) -> tuple[float, dict[str, float]]:
    """Median plain step time, and the median over rounds of each probed loop's cost in plain-step equivalents.

    In every round the three loops (plain, sequential, vectorized) run ``block`` steps each, in turn, so that
    the machine's speed drift hits them alike while each loop keeps its own data in cache as it would alone;
    the first step of a block is not timed. A round's cost is (median probed step − median plain step) /
    median plain step.
    """
    trainers = {"plain": Trainer(workload, None, False), "bare": Trainer(workload, ghosts, False, bare=True),
                "sequential": Trainer(workload, ghosts, False), "vectorized": Trainer(workload, ghosts, True)}
    plain_times: list[float] = []
    per_round: dict[str, list[float]] = {"bare": [], "sequential": [], "vectorized": []}
    for _ in range(rounds):
        medians = {}
        for name, trainer in trainers.items():
            times = [trainer.step() for _ in range(block)][1:]
            medians[name] = statistics.median(times)
        plain_times.append(medians["plain"])
        for mode in per_round:
            per_round[mode].append((medians[mode] - medians["plain"]) / medians["plain"])
    for trainer in trainers.values():
        trainer.close()
    return statistics.median(plain_times), {mode: statistics.median(v) for mode, v in per_round.items()}


def separation_cost(workload: str, repeats: int = 200) -> tuple[float, float]:
    """Median seconds of one ghost replica's training step and of one separation l2 of it from the main model."""
    trainer = Trainer(workload, 1, False)
    ghost_set = trainer.probe._ghosts  # noqa: SLF001 - the benchmark times the set's own parts
    ghost = ghost_set.live[0]
    context = ghost_set.context
    index = torch.randint(0, trainer.x.shape[0], (BATCH,), generator=trainer.generator)
    loss = trainer.criterion(trainer.model(trainer.x[index]), trainer.y[index])
    trainer.optimizer.zero_grad()
    loss.backward()
    micro_batches = trainer.probe._capture.take().micro_batches  # noqa: SLF001
    step_times, separation_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        train_replica(ghost.replica, [micro_batches], context.optimizer, context.main_params, context.replay,
                      clip_grad_norm=None, clip_grad_value=None)
        step_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        separation(ghost.replica.params, context.main_params)
        separation_times.append(time.perf_counter() - started)
    trainer.close()
    return statistics.median(step_times), statistics.median(separation_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ghosts", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # perturbation-size notes etc.; the benchmark reports times only
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH}, {args.repeats} repeats of "
          f"{args.rounds} rounds of {args.block}-step blocks per loop")
    print(f"{'model':5} {'main step':>10} {'G':>3} {'bare copies':>20} {'sequential':>20} {'vectorized':>20} "
          f"{'vec/seq':>8} {'target':>7} {'auto':>10}")
    for workload in args.workloads:
        costs(workload, 2, 1, 3)  # warm-up: first calls, allocator
        for g in args.ghosts:
            per_repeat = [costs(workload, g, args.rounds, args.block) for _ in range(args.repeats)]
            plain = statistics.median(p for p, _ in per_repeat)
            cells = []
            for mode in ("bare", "sequential", "vectorized"):
                values = [c[mode] for _, c in per_repeat]
                cells.append(f"{statistics.median(values):6.2f} ({min(values):.2f}–{max(values):.2f})")
            ratio = statistics.median((c["vectorized"] + 1) / (c["sequential"] + 1) for _, c in per_repeat)
            auto = Trainer(workload, g, "auto")  # what Ghosts(vectorize="auto") chooses here, by its own timing
            auto.close()
            print(f"{workload:5} {plain * 1e3:8.2f}ms {g:3d} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} "
                  f"{ratio:8.2f} {1.1 * g:7.1f} {auto.mode:>10}", flush=True)
    for workload in args.workloads:
        step, sep = separation_cost(workload)
        print(f"separation {workload:5}: l2 of one ghost {sep * 1e6:7.1f} µs per step, its training step "
              f"{step * 1e6:8.1f} µs ({sep / step:.1%})", flush=True)


if __name__ == "__main__":
    main()
