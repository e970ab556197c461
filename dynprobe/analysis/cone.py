"""The cone effect in numbers (the two-phase paper's §5, Fig. 5): plateaus, half-angles, lags, 2-D embedding.

All functions take the snapshot steps and the kernel-distance matrix S (eq. 4; NaN rows/columns for snapshots
without a kernel) as plain arrays; only the snapshots with a kernel are used.

* :func:`cone_numbers` — for a reference step τ, the curve S(t, τ) for t > τ (Fig. 5a): its plateau and the cone
  half-angle ``arccos(1 − max_t S(t, τ))``. S is one minus the cosine between kernels seen as vectors (Frobenius
  inner product), so ``arccos(1 − S)`` is the angle between H(θ_t) and H(θ_τ): the kernels after τ stay within a
  cone of that half-angle around H(θ_τ).
* :func:`lag_curve` — S(t, t + dt) between snapshots exactly dt apart (Fig. 5b); in the cone phase curves of
  different dt share one upper bound.
* :func:`kernel_embedding` — classical MDS of the kernel trajectory (Fig. 5c).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynprobe._util.steps import lag_pairs, most_common_gap

from .estimators import kernel_subset

__all__ = ["ConeNumbers", "ConeSummary", "KernelEmbedding", "cone_numbers", "cone_summary", "default_lags",
           "default_taus", "kernel_embedding", "lag_curve"]


@dataclass(frozen=True)
class ConeNumbers:
    """The cone around the kernel at reference step ``tau``.

    ``plateau``: median of S(t, τ) over the later half of the kernel snapshots t > τ; ``max_distance``: max over
    t > τ; ``half_angle_deg`` = degrees(arccos(1 − max_distance)) and ``plateau_angle_deg`` the same for the
    plateau; ``growth``: (mean of the last third − mean of the middle third of S(t, τ)) / plateau — near 0 on a
    plateau, large while S still grows (None with fewer than 3 points); ``points``: kernel snapshots after τ.
    """

    tau: int
    plateau: float
    max_distance: float
    half_angle_deg: float
    plateau_angle_deg: float
    growth: float | None
    points: int

    @property
    def plateaued(self) -> bool | None:
        return None if self.growth is None else bool(self.growth <= 0.2)


def _angle_deg(distance: float) -> float:
    return math.degrees(math.acos(min(max(1.0 - distance, -1.0), 1.0)))


def cone_numbers(steps: np.ndarray, S: np.ndarray, tau: int) -> ConeNumbers:
    """Plateau and half-angle of the cone around H(θ_τ) (see :class:`ConeNumbers`). ``tau`` must be a step with
    a kernel and at least one later kernel snapshot."""
    kernel_steps, K = kernel_subset(steps, S)
    where = np.flatnonzero(kernel_steps == int(tau))
    if where.size == 0:
        raise ValueError(f"tau={tau} is not a step with a kernel; kernel steps: {kernel_steps.tolist()[:12]}...")
    j = int(where[0])
    values = K[j + 1:, j]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"tau={tau} has no later kernel snapshot; choose an earlier reference step")
    plateau = float(np.median(values[values.size // 2:]))
    growth = None
    if values.size >= 3:
        third = values.size // 3
        middle, last = values[third:values.size - third], values[values.size - third:]
        growth = float((last.mean() - middle.mean()) / plateau) if plateau > 0 else 0.0
    maximum = float(values.max())
    return ConeNumbers(tau=int(tau), plateau=plateau, max_distance=maximum, half_angle_deg=_angle_deg(maximum),
                       plateau_angle_deg=_angle_deg(plateau), growth=growth, points=int(values.size))


def default_taus(kernel_steps: np.ndarray, transition_step: int | None = None, count: int = 4) -> list[int]:
    """Reference steps for Fig. 5a: ``count`` kernel steps spread linearly from the transition (or 20 % of the
    run when unknown) to 80 % of the last step — the paper's τ ∈ {2000, …, 8000} of 10⁴ — each with at least
    three later kernel snapshots."""
    kernel_steps = np.asarray(kernel_steps, dtype=np.int64)
    usable = kernel_steps[:-3] if kernel_steps.size > 3 else kernel_steps[:0]
    if usable.size == 0:
        return []
    last = float(kernel_steps[-1])
    low = float(transition_step) if transition_step is not None else 0.2 * last
    high = max(0.8 * last, low)
    picks = []
    for target in np.linspace(low, high, count):
        step = int(usable[np.argmin(np.abs(usable - target))])
        if step not in picks:
            picks.append(step)
    return sorted(picks)


def lag_curve(steps: np.ndarray, S: np.ndarray, dt: int) -> tuple[np.ndarray, np.ndarray]:
    """S(t, t + dt) over kernel snapshots exactly ``dt`` steps apart (Fig. 5b; pairs from
    :func:`dynprobe._util.steps.lag_pairs`, the definition every kernel velocity uses). Returns ``(t, values)``."""
    if isinstance(dt, bool) or not isinstance(dt, (int, np.integer)) or dt <= 0:
        raise ValueError(f"dt must be a positive number of steps; got {dt}")
    kernel_steps, K = kernel_subset(steps, S)
    i, j = lag_pairs(kernel_steps, int(dt))
    values = K[i, j] if i.size else np.zeros(0)
    finite = np.isfinite(values)
    return kernel_steps[i][finite], values[finite]


def default_lags(kernel_steps: np.ndarray, count: int = 4) -> list[int]:
    """Lags for Fig. 5b: the most common gap between kernel snapshots (the companion lag of
    ``KernelConfig(lag_steps=)``, or the regular spacing) times 1, 2, 4, 8, … (``count`` values), keeping those
    shorter than half the run that have at least three exact pairs."""
    kernel_steps = np.asarray(kernel_steps, dtype=np.int64)
    base = most_common_gap(kernel_steps)
    if base is None or kernel_steps.size < 3:
        return []
    span = kernel_steps[-1] - kernel_steps[0]
    lags = [base * 2**k for k in range(count) if base * 2**k <= span / 2]
    usable = [lag for lag in lags if lag_pairs(kernel_steps, lag)[0].size >= 3]
    return usable or [base]


@dataclass(frozen=True)
class KernelEmbedding:
    """2-D coordinates of the kernel trajectory (Fig. 5c): row k is H(θ_t) at ``steps[k]``; ``explained`` is the
    share of the (positive) spectrum each axis carries."""

    steps: np.ndarray
    coordinates: np.ndarray
    explained: tuple[float, float]


def kernel_embedding(steps: np.ndarray, S: np.ndarray) -> KernelEmbedding | None:
    """Classical MDS of the kernels on the chordal distance ``d_ij = sqrt(2 S_ij)``.

    ``d_ij`` is the Euclidean distance between the Frobenius-normalized kernels Ĥ_i = H_i/‖H_i‖_F (since
    ‖Ĥ_i − Ĥ_j‖² = 2 − 2cos = 2 S_ij), so this equals PCA of the normalized, flattened kernels — computed from S
    alone (no kernel files are read): double-centred Gram ``B = J (1 − S) J``, top two eigenpairs, coordinates
    ``v_k √λ_k``. Signs are fixed so the last kernel has positive coordinates. None with fewer than 3 kernels.
    """
    kernel_steps, K = kernel_subset(steps, S)
    if kernel_steps.size < 3 or not np.all(np.isfinite(K)):
        return None
    gram = 1.0 - K
    centred = gram - gram.mean(axis=0, keepdims=True) - gram.mean(axis=1, keepdims=True) + gram.mean()
    eigenvalues, eigenvectors = np.linalg.eigh((centred + centred.T) / 2)
    order = np.argsort(eigenvalues)[::-1][:2]
    top = np.clip(eigenvalues[order], 0.0, None)
    coordinates = eigenvectors[:, order] * np.sqrt(top)[None, :]
    for axis in range(2):
        if coordinates[-1, axis] < 0:
            coordinates[:, axis] *= -1
    positive = eigenvalues[eigenvalues > 0].sum()
    explained = tuple(float(v / positive) if positive > 0 else 0.0 for v in top)
    return KernelEmbedding(kernel_steps, coordinates, explained)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ConeSummary:
    """The cone numbers of a run: per reference τ (:class:`ConeNumbers`), the upper bound of S(t, t + dt) after
    the transition per lag dt (``lag_bounds``; ``lag_bound_ratio`` = largest / smallest bound — near 1 when curves
    of different dt share one upper bound, the paper's cone signature; ≈ the lag ratio for a random walk), and
    the kernel embedding. ``available`` is False (with ``reason``) without enough kernels."""

    available: bool
    reason: str | None
    kernel_steps: np.ndarray
    cones: tuple[ConeNumbers, ...] = ()
    lags: tuple[int, ...] = ()
    lag_bounds: dict[int, float] | None = None
    lag_bound_ratio: float | None = None
    embedding: KernelEmbedding | None = None

    @property
    def lag_bound_reading(self) -> str | None:
        """What ``lag_bound_ratio`` says, read against its two references: 1 (one shared bound, the cone) and
        the ratio of the lags themselves (each curve its own bound, as for a random walk, where S grows ∝ dt). A
        factor of two either way counts as "close"; None without a ratio."""
        ratio = self.lag_bound_ratio
        if ratio is None or not self.lag_bounds:
            return None
        lags = [dt for dt, bound in self.lag_bounds.items() if bound > 0]
        walk = max(lags) / min(lags)
        if ratio <= 2:
            return "close to 1: the curves share one upper bound, the cone's signature"
        if walk / 2 <= ratio <= 2 * walk:
            return f"close to the lag ratio {walk:g}: each lag has its own bound, as for a random walk — no cone"
        if ratio > 2 * walk:
            return (f"far above both 1 and the lag ratio {walk:g}: the longer lags reach much farther than a "
                    "random walk would — no shared bound")
        return f"between 1 and the lag ratio {walk:g}: neither one shared bound nor a random walk"


def cone_summary(steps: np.ndarray, S: np.ndarray, *, taus: Sequence[int] | None = None,
                 transition_step: int | None = None) -> ConeSummary:
    """Cone numbers for ``taus`` (default :func:`default_taus` after ``transition_step``), the lag bounds for
    :func:`default_lags` over t ≥ ``transition_step``, and the embedding."""
    kernel_steps, _ = kernel_subset(steps, S)
    if kernel_steps.size < 4:
        reason = ("no eNTK kernels in this run: pass Probe(..., kernel=dynprobe.KernelConfig())"
                  if kernel_steps.size == 0
                  else f"only {kernel_steps.size} kernel snapshot(s); the cone needs at least 4")
        return ConeSummary(False, reason, kernel_steps)
    chosen = list(taus) if taus is not None else default_taus(kernel_steps, transition_step)
    cones = tuple(cone_numbers(steps, S, tau) for tau in chosen)
    lags = tuple(default_lags(kernel_steps))
    start = transition_step if transition_step is not None else 0
    bounds: dict[int, float] = {}
    for dt in lags:
        t, values = lag_curve(steps, S, dt)
        late = values[t >= start]
        if late.size:
            bounds[dt] = float(late.max())
    positive = [b for b in bounds.values() if b > 0]
    ratio = max(positive) / min(positive) if len(positive) >= 2 else None
    return ConeSummary(True, None, kernel_steps, cones, lags, bounds, ratio, kernel_embedding(steps, S))
