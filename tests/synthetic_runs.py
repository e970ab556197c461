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
from dynprobe.store.layout import (
    KERNEL_LAYERS,
    barriers_path,
    layer_metric,
    rows_path,
    separation_path,
    switching_results_path,
)
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
    separation: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # ghost → (steps, l2)


#: The simulated model's parameter tensors (name, offset, numel): layers ``features.0``, ``features.3`` and
#: ``head`` own θ[0:28], θ[28:52] and θ[52:64].
PARAMETERS = [("features.0.weight", 0, 24), ("features.0.bias", 24, 4), ("features.3.weight", 28, 24),
              ("head.weight", 52, 8), ("head.bias", 60, 4)]
LAYERS = {"features.0": slice(0, 28), "features.3": slice(28, 52), "head": slice(52, 64)}
#: Each layer's share of a ghost's squared separation: early (chaotic) ghosts, late ghosts.
SEPARATION_SHARES = {True: (0.6, 0.3, 0.1), False: (0.2, 0.3, 0.5)}


def _cosine_dissimilarity(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0) * (1 - np.eye(len(vectors)))


def _manifest(model_class: str, eval_n: int, kernels: bool, ghosts: list[int], command: str) -> dict:
    config = {
        "schedule": {"kind": "synthetic"}, "eval_max": eval_n, "eval_batch_size": 256, "total_steps": None,
        "barriers": {"alphas": 30, "ghosts": bool(ghosts), "previous_snapshots": 1, "every_snapshots": 1,
                     "time_budget": "inf", "auto_budget_fraction": 0.5},
        "seed": 0, "snapshot_on_close": True,
        "ghosts": ({"at": {"kind": "at", "steps": ghosts}, "perturbation": {"norm": 1e-7, "kind": "l2", "seed": 0},
                    "control": True, "kernel_every_snapshots": 1}
                   if ghosts else None),
    }
    if kernels:
        config["kernel"] = {"n": 128, "mode": "trace", "seed": 0, "every_snapshots": 1, "bn": "eval",
                            "max_memory": None, "class_index": None}
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
                  "parameters": [{"name": name, "shape": [numel], "dtype": "float32", "offset": offset,
                                  "numel": numel} for name, offset, numel in PARAMETERS],
                  "buffers": []},
        "optimizer": {"class": "SGD", "defaults": {"lr": 0.1, "momentum": 0.9}},
        "eval": {"n": eval_n, "num_classes": 10, "fingerprint": "synthetic"},
        "conventions": conventions,
    }


#: Where a ghost spawned after the transition saturates, relative to the chaotic level (the two-phase paper's
#: late ghosts end up orders of magnitude closer to the main run than the early ones).
LATE_CEILING = 1e-4


def _separation_model(spawn: int, until: int, transition: int, *, chaos_rate: float, late_rate: float,
                      realized: float, saturation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """l2(t) of a perturbed ghost after every step from its spawn to ``until``: ε grows at ``chaos_rate`` per
    step before the transition and at ``late_rate`` after it, saturating at ``saturation``, with a small
    multiplicative noise. A pure function of its arguments, so a run cut earlier holds a prefix of the same curve."""
    steps = np.arange(spawn, until + 1, dtype=np.int64)
    rate = np.where(steps[:-1] < transition, chaos_rate, late_rate)
    log_growth = np.concatenate([[0.0], np.cumsum(rate)])
    noise = np.random.default_rng([seed, spawn]).normal(0, 0.05, steps.size)
    noise[0] = 0.0
    log_l2 = np.log(realized) + log_growth + noise
    # Saturation: two replicas that have forgotten ε are as far apart as the distance the run travels in its
    # chaotic phase, which grows until the transition (so main-vs-ghost C levels off there, as in Fig. 3a). A ghost
    # spawned after the transition stays in the main run's basin: its separation saturates LATE_CEILING lower.
    ceiling = saturation * (0.1 + 0.9 * np.minimum(steps, transition) / max(transition, 1))
    if spawn >= transition:
        ceiling = np.full(steps.shape, saturation * LATE_CEILING)
    log_l2 = -np.logaddexp(-4 * log_l2, -4 * np.log(ceiling)) / 4  # nearly hard
    return steps, np.exp(log_l2)


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
    horizon: int | None = None,
    keep: np.ndarray | None = None,
    kernel_lag: int | None = None,
    separation: bool = True,
    chaos_rate: float = 0.12,
    late_rate: float = 0.05,
    control_drift: float = 0.0,
    last_spike: float = 0.0,
    layers: bool = True,
) -> SyntheticTruth:
    """Write a run directory at ``root`` (see the module docstring); ``status``: ``"closed"``, ``"running"`` (the
    writer is this live process) or ``"interrupted"`` (the writer's pid is a finished process).

    The dynamics are simulated on ``steps`` (plus, with ``kernel_lag``, a companion snapshot ``kernel_lag`` steps
    after each kernel snapshot) and then written for the snapshots at or before ``horizon`` that are in ``keep``
    (default: all): the same seed gives the same trajectory, so a run cut at an earlier horizon or thinned is a
    subset of the full one. Separation curves (``ghosts/ghost_NNN.separation``): l2 after every step from each
    ghost's spawn to the horizon (:func:`_separation_model`, ``chaos_rate``/``late_rate`` per step; the control
    holds ``control_drift`` · step, exactly 0 by default). ``last_spike`` multiplies the last written C row's
    distances to earlier snapshots by (1 + last_spike) (a spike at the last snapshot). ``layers``: also write the
    per-layer C rows (``metrics/C.layer_NNN.rows``; layers :data:`LAYERS`), each kernel snapshot's per-layer kernels
    (``kernel_layers``, the (L, 8, 12)-reshaped simulated H_l, so ``run.S_layers`` is 1 − cos of the flattened
    H_l) and each ghost comparison's ``L2_layers`` (shares :data:`SEPARATION_SHARES`).
    """
    rng = np.random.default_rng(seed)
    steps = log_linear_steps(2000) if steps is None else np.asarray(steps, dtype=np.int64)
    base_kernel = np.zeros(steps.size, dtype=bool)
    base_kernel[::kernel_every] = True
    base_kernel[-1] = True
    if kernel_lag is not None:
        companions = steps[base_kernel] + kernel_lag
        kernel_steps = np.union1d(steps[base_kernel], companions)
        steps = np.union1d(steps, companions)
        base_kernel = np.isin(steps, kernel_steps)
    T = steps.size

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

    # Kernels: fast walk, then an Ornstein–Uhlenbeck process around h(transition) (the cone).
    kernel_vectors = None
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
        kernel_vectors = h
        # Per-layer kernels H = Σ_l H_l: fixed shares of h plus walks that cancel in the sum.
        walks = np.cumsum(0.01 * np.sqrt(np.diff(steps, prepend=0))[None, :, None] * rng.normal(size=(2, T, m)),
                          axis=1)
        layer_kernels = np.stack([0.5 * h + walks[0], 0.3 * h + walks[1], 0.2 * h - walks[0] - walks[1]])

    # Main-run curves.
    progress = 1 - np.exp(-steps / max(transition, 1))
    accuracy = np.clip(0.1 + 0.8 * progress + rng.normal(0, 0.005, T), 0, 1)
    eval_loss = 2.3 * np.exp(-2.5 * progress) + 0.25 + rng.normal(0, 0.005, T)
    # Predictions on the eval set drift with the parameters: a share of labels flips between snapshots.
    full_C = _cosine_dissimilarity(theta)
    preds_rng = np.random.default_rng(seed + 1)
    labels = np.empty((T, eval_n), dtype=np.int16)
    labels[0] = preds_rng.integers(0, 10, eval_n)
    consecutive = np.array([full_C[k, k - 1] for k in range(1, T)])
    for k in range(1, T):
        share = 0.3 * np.sqrt(consecutive[k - 1] / max(consecutive.max(), 1e-300))
        labels[k] = labels[k - 1]
        flip = preds_rng.random(eval_n) < share
        labels[k, flip] = preds_rng.integers(0, 10, int(flip.sum()))

    # The snapshots that are written: at or before the horizon, and in ``keep``.
    horizon = int(steps[-1]) if horizon is None else int(horizon)
    written = (steps <= horizon) & (np.isin(steps, keep) if keep is not None else True)
    idx = np.flatnonzero(written)
    steps_w, theta_w = steps[idx], theta[idx]
    C = _cosine_dissimilarity(theta_w)
    if last_spike:
        C[-1, :-1] *= 1 + last_spike
        C[:-1, -1] = C[-1, :-1]
    D = np.stack([np.mean(labels[idx] != labels[k], axis=1) for k in idx])
    np.fill_diagonal(D, 0.0)
    has_kernel = base_kernel[idx] if kernels else np.zeros(idx.size, dtype=bool)
    S = np.full((idx.size, idx.size), np.nan)
    if kernels:
        S[np.ix_(has_kernel, has_kernel)] = _cosine_dissimilarity(kernel_vectors[idx][has_kernel])

    per_layer = [("C", i, _cosine_dissimilarity(theta_w[:, part])) for i, part in enumerate(LAYERS.values())]

    root = Path(root)
    writer = RunWriter(root, _manifest(model_class, eval_n, kernels, list(ghosts), f"synthetic {root}"),
                       resume=False)
    matrices = [(name, matrix) for name, matrix in (("C", C), ("D", D)) + ((("S", S),) if kernels else ())]
    matrices += [(layer_metric(name, i), matrix) for name, i, matrix in per_layer] if layers else []
    for name, matrix in matrices:
        rows = TriangularRows(rows_path(root, name))
        for k in range(idx.size):
            rows.append(matrix[k, : k + 1], k)

    truth = SyntheticTruth(root, steps_w, transition, theta_w, kernel_vectors[idx] if kernels else None)
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
    realized = 6e-8
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for ghost, spawn, is_control in spawn_rows:
        if spawn > horizon:
            continue
        if is_control:
            sep_steps = np.arange(spawn, horizon + 1, dtype=np.int64)
            curves[ghost] = (sep_steps, control_drift * (sep_steps - spawn).astype(np.float64))
        else:
            curves[ghost] = _separation_model(spawn, horizon, transition, chaos_rate=chaos_rate,
                                              late_rate=late_rate, realized=realized, saturation=1.0, seed=seed)
    truth.separation = curves
    spawned: set[int] = set()
    for k, step in zip(idx, steps_w):
        for ghost, spawn, is_control in spawn_rows:
            if spawn <= step and ghost not in spawned:
                spawned.add(ghost)
                writer.event("ghost_spawn", ghost=ghost, step=int(spawn), spawn_step=spawn, control=is_control,
                             kind="l2", seed=ghost, nominal_norm=0.0 if is_control else 1e-7,
                             realized_norm=0.0 if is_control else realized, changed=0 if is_control else 1000,
                             total=64, direction_cosine=1.0, share_on_zeros=0.0)
            if ghost in spawned:
                sep_steps, l2 = curves[ghost]
                compare = _ghost_compare(ghost, spawn, is_control, int(step), transition, accuracy[k], eval_loss[k],
                                         float(l2[int(step) - spawn]), seed)
                if layers:
                    shares = SEPARATION_SHARES[spawn < transition]
                    compare["L2_layers"] = [compare["L2"] * float(np.sqrt(share)) for share in shares]
                writer.event("ghost_compare", **compare)
                writer.event("ghost_barrier", ghost=ghost, step=int(step), B=compare["B"],
                             B_linear=compare["B_linear"], argmax_alpha=0.5, alphas=11)
        if layers and kernels and base_kernel[k]:  # each layer's kernel H_l (n × n, n = 8 here; H = Σ_l H_l)
            writer.save_array(int(step), KERNEL_LAYERS, layer_kernels[:, k].reshape(len(LAYERS), 8, 12))
        record = {"step": int(step), "eval_loss": float(eval_loss[k]), "eval_accuracy": float(accuracy[k]),
                  "kernel": bool(base_kernel[k]) if kernels else False,
                  "train_loss": float(eval_loss[k] * 0.9) if step != steps_w[0] else None,
                  "lr": [0.1], "C_prev": None}
        writer.commit_snapshot(record)
    if separation:
        for ghost, (sep_steps, l2) in curves.items():
            path = separation_path(root, ghost)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.stack([sep_steps.astype("<f8"), l2.astype("<f8")], axis=1).astype("<f8").tofile(path)
    if barriers:
        for k in range(1, idx.size):
            value = float(0.05 * C[k, k - 1] / max(C.max(), 1e-12))
            append_jsonl(barriers_path(root), {"i": int(steps_w[k]), "j": int(steps_w[k - 1]), "value": value,
                                               "B": value, "B_linear": 0.5 * value, "argmax_alpha": 0.5,
                                               "alphas": 30, "metric": "loss"})
    if switching:
        switching_results_path(root).parent.mkdir(exist_ok=True)
        for switch in np.linspace(0, steps_w[-1], 6).astype(int):
            append_jsonl(switching_results_path(root), {
                "switch_step": int(switch), "total_steps": int(steps_w[-1]),
                "eval_accuracy": float(0.5 + 0.4 * (1 - np.exp(-switch / max(transition, 1)))),
                "eval_loss": float(1.5 * np.exp(-switch / max(transition, 1)) + 0.3)})
    if status == "closed":
        for ghost, _, _ in spawn_rows:
            if ghost in spawned:
                writer.event("ghost_status", ghost=ghost, step=int(steps_w[-1]), status="finished",
                             reason="run closed")
        writer.update_manifest(status="closed", final_step=int(steps_w[-1]))
        writer.event("close", step=int(steps_w[-1]), status="closed", reason=None)
    elif status == "interrupted":
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True)
        writer.update_manifest(writer={**writer.manifest["writer"], "pid": int(finished.stdout)})
    elif status != "running":
        raise ValueError(f"status must be 'closed', 'running' or 'interrupted'; got {status!r}")
    return truth


def _ghost_compare(ghost: int, spawn: int, control: bool, step: int, transition: int, accuracy: float, loss: float,
                   l2: float, seed: int) -> dict:
    """Main-vs-ghost metrics at ``step`` for a ghost spawned at ``spawn`` whose separation is ``l2``
    (‖θ‖ ≈ 8, so C ≈ ½ (l2 / 8)²); D and the barriers grow with the share of the saturation reached."""
    if control:
        return {"ghost": ghost, "step": step, "C": 0.5 * (l2 / 8.0) ** 2, "L2": l2, "D": 0.0, "B": 0.0,
                "B_linear": 0.0, "eval_loss": loss, "eval_accuracy": accuracy}
    rng = np.random.default_rng([seed, ghost, step])
    error = 1 - accuracy
    reached = float(np.clip(np.log(l2 / 6e-8) / np.log(1.0 / 6e-8), 0, 1)) ** 4  # ~1 once saturated
    c = 0.5 * (l2 / 8.0) ** 2
    d = float(np.clip(error * 0.8 * reached * (1 + 0.05 * rng.normal()), 0, 1)) if reached > 1e-3 else float(
        min(error * 0.03, 0.001 * (1 + rng.random())))
    b_linear = 0.3 * loss * reached + 1e-5 * loss
    b = b_linear + 0.01 * loss  # eq. 5 adds about half the endpoint loss gap
    return {"ghost": ghost, "step": step, "C": float(c), "L2": float(l2), "D": d, "B": float(b),
            "B_linear": float(b_linear), "eval_loss": loss + b, "eval_accuracy": accuracy - d / 4}
