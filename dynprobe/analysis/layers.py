"""Which layers move, which layers move the kernel, which layers carry a ghost's separation.

A *layer* is a module that owns parameter tensors (``run.layers``; ``""`` is the root module). From the per-layer
matrices of a run:

* C_l(t, t + Δ) — how much the direction of layer l's parameters turns over a fixed lag Δ (eq. 1 on the layer's
  slice of θ), from ``run.C_layers``;
* S_l(t, t + Δ) and S_l(t, τ) — the same for the layer's share of the eNTK, H = Σ_l H_l (eq. 4 on H_l), from
  ``run.S_layers`` when the run recorded per-layer kernels;
* the layers' share of each ghost's separation, ‖θ'_l − θ_l‖² / ‖θ' − θ‖² at its last comparison (the squares
  add up to 1), from the ``L2_layers`` of the ghost comparisons.

Pairs Δ steps apart come from :func:`dynprobe._util.steps.lag_pairs` (Δ the most common gap between snapshots,
or the kernel lag for S). Anything the run lacks is None, with a sentence saying how to get it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dynprobe._util.steps import lag_pairs, most_common_gap
from dynprobe.store.run import Run

__all__ = ["LayerView", "layer_view"]


@dataclass(frozen=True)
class LayerView:
    """Per-layer series of a run (see the module docstring); ``(L, …)`` arrays in ``layers`` order."""

    layers: list[str]
    C_lag: int | None = None
    C_steps: np.ndarray | None = None
    C: np.ndarray | None = None
    S_lag: int | None = None
    S_steps: np.ndarray | None = None
    S: np.ndarray | None = None
    tau: int | None = None
    S_tau_steps: np.ndarray | None = None
    S_tau: np.ndarray | None = None
    ghost_spawns: list[int] = field(default_factory=list)
    separation_share: np.ndarray | None = None
    missing: list[str] = field(default_factory=list)


def _lagged(steps: np.ndarray, matrices: np.ndarray, lag: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if lag is None:
        return None, None
    earlier, later = lag_pairs(steps, lag)
    if earlier.size == 0:
        return None, None
    return steps[earlier], matrices[:, earlier, later]


def _separation_shares(run: Run, layers: list[str]) -> tuple[list[int], np.ndarray | None]:
    last: dict[int, list[float]] = {}
    for event in run.events:
        if event.get("event") == "ghost_compare" and isinstance(event.get("L2_layers"), list):
            values = event["L2_layers"]
            if len(values) == len(layers) and all(isinstance(v, (int, float)) for v in values):
                last[int(event["ghost"])] = [float(v) for v in values]
    spawns, shares = [], []
    for ghost in run.ghosts:
        values = last.get(ghost.ghost_id)
        if ghost.control or values is None:
            continue
        squares = np.square(np.asarray(values, dtype=np.float64))
        total = squares.sum()
        if not total > 0:
            continue
        spawns.append(ghost.spawn_step)
        shares.append(squares / total)
    return spawns, (np.stack(shares, axis=1) if shares else None)


def layer_view(run: Run, *, transition: int | None = None) -> LayerView:
    """The per-layer series of ``run``; ``transition`` picks the reference τ of S_l(t, τ) (the first kernel step at
    or after it; the first kernel step without one)."""
    layers = list(run.layers)
    missing: list[str] = []
    if not layers:
        return LayerView([], missing=["the manifest lists no parameters, so no layers"])
    steps = run.steps
    C_layers = run.C_layers
    c_lag = most_common_gap(steps)
    c_steps, c_values = (None, None)
    if C_layers.shape[0] == len(layers) and np.isfinite(C_layers).any():
        c_steps, c_values = _lagged(steps, C_layers, c_lag)
    else:
        missing.append("no per-layer C in this run (recorded by newer dynprobe versions at every snapshot)")
    S_layers = run.S_layers
    s_lag, s_steps, s_values, tau, tau_steps, s_tau = None, None, None, None, None, None
    if S_layers.shape[0] == len(layers) and np.isfinite(S_layers).any():
        have = np.isfinite(np.diagonal(S_layers[0]))
        kernel_steps = steps[have]
        sub = S_layers[:, have][:, :, have]
        s_lag = run.kernel_lag_steps
        s_steps, s_values = _lagged(kernel_steps, sub, s_lag)
        if kernel_steps.size >= 2:
            start = int(np.searchsorted(kernel_steps, transition)) if transition is not None else 0
            j = min(start, kernel_steps.size - 2)
            tau, tau_steps, s_tau = int(kernel_steps[j]), kernel_steps[j:], sub[:, j:, j]
    else:
        missing.append("no per-layer eNTK: pass Probe(..., kernel=dynprobe.KernelConfig(per_layer=True)) to see "
                       "which layers move the kernel")
    spawns, shares = _separation_shares(run, layers)
    if shares is None and any(not g.control for g in run.ghosts):
        missing.append("the ghost comparisons carry no per-layer separation (L2_layers): record the run with a "
                       "newer dynprobe")
    return LayerView(layers, c_lag if c_values is not None else None, c_steps, c_values, s_lag, s_steps, s_values,
                     tau, tau_steps, s_tau, spawns, shares, missing)
