"""Synthetic run directories with a planted phase transition, written through the real store/writer API.

Not collected by pytest (no ``test_`` prefix). :func:`write_synthetic_run` simulates, at the run's snapshot steps,

* parameters θ_t ∈ R^p whose direction rotates at constant angular speed until the planted step
  ``transition`` and then stops (shape ``"plateau"``) or turns slightly back (``"peak"``), plus a small random
  walk, so the rows C(t0, ·) of the trajectory map rise until ``transition`` and then flatten or dip — the
  paper's Finding I;
* flattened kernels h_t ∈ R^m: a fast random walk until ``transition`` (``velocity="step"``: v constant, then a
  sharp drop; ``"power"``: v ∝ t^-1/2, then a floor), then an Ornstein–Uhlenbeck process around h(transition) —
  a cone: S(t, τ) plateaus;
* ghosts spawned before ``transition`` that diverge (final D near the eval error, C ~1e-2, large B) and ghosts
  spawned after it that stay close (D, B, C orders of magnitude smaller), plus an ε = 0 control;
* eval loss/accuracy, train loss, lr, a few trajectory barriers and switching results.

C, S, D are computed exactly (numpy, float64) from the simulated vectors and appended row by row with
:class:`dynprobe.store.TriangularRows`; events and the manifest go through :class:`dynprobe.writer.RunWriter`.
The returned :class:`SyntheticTruth` holds the simulated vectors so tests can check estimates independently.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynprobe.store.files import append_jsonl
from dynprobe.store.layout import SWITCHING
from dynprobe.store.rows import TriangularRows
from dynprobe.store.writer import RunWriter

__all__ = ["SyntheticTruth", "log_linear_steps", "uniform_steps", "write_synthetic_run"]


def log_linear_steps(last: int, *, per_decade: int = 12, every: int = 50) -> np.ndarray:
    """0, then log-spaced steps up to ``6·every``, then every ``every`` steps to ``last`` (the demo's shape)."""
    dense_until = min(6 * every, last)
    logs = np.unique(np.round(np.logspace(0, np.log10(dense_until), per_decade * int(np.log10(dense_until)) + 1)))
    linear = np.arange(every, last + 1, every)
    return np.unique(np.concatenate([[0], logs, linear, [last]]).astype(np.int64))


def uniform_steps(last: int, count: int) -> np.ndarray:
    return np.unique(np.linspace(0, last, count).round().astype(np.int64))


@dataclass
class SyntheticTruth:
    root: Path
    steps: np.ndarray
    transition: int
    theta: np.ndarray  # (T, p)
    kernels: np.ndarray | None  # (T, m) flattened kernels, or None
    spawn_steps: list[int] = field(default_factory=list)
    diverging: list[bool] = field(default_factory=list)


def _cosine_dissimilarity(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0) * (1 - np.eye(len(vectors)))


def _manifest(model_class: str, eval_n: int, kernels: bool, ghosts: list[int], command: str) -> dict:
    config = {
        "schedule": {"kind": "synthetic"}, "eval_max": eval_n, "eval_batch_size": 256, "total_steps": None,
        "trajectory_barriers": 1, "barrier_alphas": 30, "seed": 0, "snapshot_on_close": True,
        "ghosts": ({"at": {"kind": "at", "steps": ghosts}, "perturbation": {"norm": 1e-7, "kind": "l2", "seed": 0},
                    "control": True, "barrier": True, "barrier_alphas": 30, "costly_every": 1}
                   if ghosts else None),
    }
    if kernels:
        config["kernel"] = {"n": 128, "mode": "trace", "seed": 0, "every": 1, "bn": "eval", "max_memory": None,
                            "class_index": None}
    conventions = {
        "C": "eq. (1): 1 - <θ_i, θ_j> / (‖θ_i‖‖θ_j‖), float64 accumulation",
        "D": "eq. (6): fraction of eval examples whose argmax prediction differs",
        "S": "eq. (4) on the eNTK in trace mode, float64",
    }
    if ghosts:
        conventions["ghosts"] = "sequential deep copies compared with the main model itself (not a vmapped shadow)"
    return {
        "dynprobe_version": "0.1.0", "torch_version": "synthetic", "numpy_version": np.__version__,
        "python_version": sys.version.split()[0], "command": command, "config": config,
        "model": {"class": model_class, "num_parameters": 64, "storage_dtype": "float32", "device": "cpu",
                  "parameters": [{"name": "w", "shape": [64], "dtype": "float32", "offset": 0, "numel": 64}],
                  "buffers": []},
        "optimizer": {"class": "SGD", "defaults": {"lr": 0.1, "momentum": 0.9}},
        "eval": {"n": eval_n, "num_classes": 10, "fingerprint": "synthetic"},
        "conventions": conventions,
    }


def write_synthetic_run(
    root: str | os.PathLike,
    *,
    steps: np.ndarray | None = None,
    transition: int = 300,
    kernels: bool = True,
    ghosts: tuple[int, ...] = (0, 50, 150, 600, 1200),
    control: bool = True,
    c_shape: str = "plateau",
    velocity: str = "step",
    switching: bool = True,
    barriers: bool = True,
    status: str = "closed",
    model_class: str = "SyntheticNet",
    eval_n: int = 1000,
    kernel_every: int = 1,
    seed: int = 0,
) -> SyntheticTruth:
    """Write a run directory at ``root`` (see the module docstring); ``status``: ``"closed"``, ``"running"`` (the
    writer is this live process) or ``"interrupted"`` (the writer's pid is a finished process)."""
    rng = np.random.default_rng(seed)
    steps = log_linear_steps(2000) if steps is None else np.asarray(steps, dtype=np.int64)
    T = steps.size
    before = steps <= transition

    # Parameters: the direction of θ rotates at a constant angular speed until the transition and then stops
    # ("plateau") or turns slightly back ("peak"), plus a small random walk in every coordinate.
    p = 64
    u, w = np.linalg.qr(rng.normal(size=(p, 2)))[0].T
    total_angle = 1.2
    angle = total_angle * np.minimum(steps, transition) / max(transition, 1)
    if c_shape == "peak":
        angle = angle - 0.05 * total_angle * np.clip((steps - transition) / max(steps[-1] - transition, 1), 0, 1)
    elif c_shape != "plateau":
        raise ValueError(f"c_shape must be 'plateau' or 'peak'; got {c_shape!r}")
    noise = np.cumsum(0.004 * np.sqrt(np.diff(steps, prepend=0))[:, None] * rng.normal(size=(T, p)), axis=0)
    theta = 8.0 * (np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * w) + noise
    C = _cosine_dissimilarity(theta)

    # Kernels: fast walk, then an Ornstein–Uhlenbeck process around h(transition) (the cone).
    kernel_vectors = None
    S = np.full((T, T), np.nan)
    has_kernel = np.zeros(T, dtype=bool)
    if kernels:
        m = 96
        h = np.empty((T, m))
        h[0] = rng.normal(0, 1.0, m) + 3.0
        anchor = None
        for k in range(1, T):
            dt = steps[k] - steps[k - 1]
            if steps[k] <= transition:
                scale = 0.05 if velocity == "step" else 0.05 * (max(steps[k], 1) / max(transition, 1)) ** -0.25
                h[k] = h[k - 1] + scale * np.sqrt(dt) * rng.normal(size=m)
            else:
                if anchor is None:
                    anchor = h[k - 1].copy()
                rho = 0.995 ** dt
                h[k] = anchor + rho * (h[k - 1] - anchor) + 0.02 * np.sqrt(1 - rho**2) * rng.normal(size=m)
        has_kernel[::kernel_every] = True
        has_kernel[-1] = True
        kernel_vectors = h
        Sk = _cosine_dissimilarity(h[has_kernel])
        S[np.ix_(has_kernel, has_kernel)] = Sk

    # Main-run curves.
    progress = 1 - np.exp(-steps / max(transition, 1))
    accuracy = np.clip(0.1 + 0.8 * progress + rng.normal(0, 0.005, T), 0, 1)
    eval_loss = 2.3 * np.exp(-2.5 * progress) + 0.25 + rng.normal(0, 0.005, T)
    # Predictions on the eval set drift with the parameters: a share of labels flips between snapshots.
    preds_rng = np.random.default_rng(seed + 1)
    labels = np.empty((T, eval_n), dtype=np.int16)
    labels[0] = preds_rng.integers(0, 10, eval_n)
    consecutive = np.array([C[k, k - 1] for k in range(1, T)])
    for k in range(1, T):
        share = 0.3 * np.sqrt(consecutive[k - 1] / max(consecutive.max(), 1e-300))
        labels[k] = labels[k - 1]
        flip = preds_rng.random(eval_n) < share
        labels[k, flip] = preds_rng.integers(0, 10, int(flip.sum()))
    D = np.stack([np.mean(labels != labels[k], axis=1) for k in range(T)])
    np.fill_diagonal(D, 0.0)

    root = Path(root)
    writer = RunWriter(root, _manifest(model_class, eval_n, kernels, list(ghosts), f"synthetic {root}"),
                       resume=False)
    for name, matrix in (("C", C), ("D", D)) + ((("S", S),) if kernels else ()):
        rows = TriangularRows(writer.metrics_path(f"{name}.rows"))
        for k in range(T):
            rows.append(matrix[k, : k + 1], k)

    truth = SyntheticTruth(root, steps, transition, theta, kernel_vectors)
    spawn_rows = []
    if ghosts:
        index = 0
        if control:
            spawn_rows.append((index, int(ghosts[0]), True))
            index += 1
        for spawn in ghosts:
            spawn_rows.append((index, int(spawn), False))
            truth.spawn_steps.append(int(spawn))
            truth.diverging.append(spawn < transition)
            index += 1
    spawned: set[int] = set()
    for k, step in enumerate(steps):
        for ghost, spawn, is_control in spawn_rows:
            if spawn == step and ghost not in spawned:
                spawned.add(ghost)
                writer.event("ghost_spawn", ghost=ghost, step=int(step), spawn_step=spawn, control=is_control,
                             kind="l2", seed=ghost, nominal_norm=0.0 if is_control else 1e-7,
                             realized_norm=0.0 if is_control else 6e-8, changed=0 if is_control else 1000,
                             total=64, direction_cosine=1.0, share_on_zeros=0.0)
            if ghost in spawned:
                writer.event("ghost_compare", **_ghost_compare(ghost, spawn, is_control, int(step), transition,
                                                               accuracy[k], eval_loss[k], steps[-1], rng))
        record = {"step": int(step), "eval_loss": float(eval_loss[k]), "eval_accuracy": float(accuracy[k]),
                  "kernel": bool(has_kernel[k]), "train_loss": float(eval_loss[k] * 0.9) if k else None,
                  "lr": [0.1], "C_prev": float(C[k, k - 1]) if k else None}
        writer.commit_snapshot(record)
    if barriers:
        for k in range(1, T):
            append_jsonl(root / "metrics" / "B.jsonl", {"i": int(steps[k]), "j": int(steps[k - 1]),
                                                       "value": float(0.05 * C[k, k - 1] / max(C.max(), 1e-12)),
                                                       "argmax_alpha": 0.5, "alphas": 30, "metric": "loss"})
    if switching:
        (root / SWITCHING).mkdir(exist_ok=True)
        for switch in np.linspace(0, steps[-1], 6).astype(int):
            append_jsonl(root / SWITCHING / "results.jsonl", {
                "switch_step": int(switch), "total_steps": int(steps[-1]),
                "eval_accuracy": float(0.5 + 0.4 * (1 - np.exp(-switch / max(transition, 1)))),
                "eval_loss": float(1.5 * np.exp(-switch / max(transition, 1)) + 0.3)})
    if status == "closed":
        for ghost, _, _ in spawn_rows:
            writer.event("ghost_status", ghost=ghost, step=int(steps[-1]), status="finished", reason="run closed")
        writer.update_manifest(status="closed", final_step=int(steps[-1]))
        writer.event("close", step=int(steps[-1]), status="closed", reason=None)
    elif status == "interrupted":
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True)
        writer.update_manifest(writer={**writer.manifest["writer"], "pid": int(finished.stdout)})
    elif status != "running":
        raise ValueError(f"status must be 'closed', 'running' or 'interrupted'; got {status!r}")
    return truth


def _ghost_compare(ghost: int, spawn: int, control: bool, step: int, transition: int, accuracy: float, loss: float,
                   last: int, rng: np.random.Generator) -> dict:
    """Main-vs-ghost metrics at ``step`` for a ghost spawned at ``spawn``."""
    if control:
        return {"ghost": ghost, "step": step, "C": 0.0, "L2": 0.0, "D": 0.0, "B": 0.0, "eval_loss": loss,
                "eval_accuracy": accuracy}
    age = step - spawn
    error = 1 - accuracy
    if spawn < transition:
        # ε amplified exponentially until the transition, peaking there, then a slow decline (Fig. 3a shape).
        growth = min(1.0, age / max(transition - spawn, 1)) if step <= transition else 1.0
        peak = 1e-2 * (1 - 0.3 * spawn / transition)
        log_c = np.log10(1e-14) + growth * (np.log10(peak) - np.log10(1e-14))
        c = 10**log_c if step <= transition else peak * (1 - 0.3 * (step - transition) / max(last - transition, 1))
        d = error * 0.8 * growth * (1 + 0.05 * rng.normal())
        b = 0.3 * loss * growth
    else:
        c = 1e-12 * (1 + age / 100)
        d = min(error * 0.03, 0.001 * (1 + rng.random()))
        b = 1e-4 * loss
    d = float(np.clip(d, 0, 1))
    return {"ghost": ghost, "step": step, "C": float(c), "L2": float(np.sqrt(2 * c) * 8.0), "D": d, "B": float(b),
            "eval_loss": loss + b, "eval_accuracy": accuracy - d / 4}
