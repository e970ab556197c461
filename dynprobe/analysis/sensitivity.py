"""How strongly does training amplify a tiny perturbation, and when does that stop? The ``"chaos"`` estimate.

A ghost is a copy of the model perturbed at its spawn step t0 by ε and trained on the same batches (the two-phase
paper's Fig. 2). Its *separation curve* is l2(t) = ‖θ'_t − θ_t‖₂, recorded after every step it takes (and at its
spawn); ``δ(t) = l2(t) / ‖ε‖`` with ‖ε‖ the perturbation that survived the float add (``realized_norm``).

* amplification over a window of Δ steps after the spawn: ``A(t0, Δ) = δ(t0 + Δ)``;
* finite-time growth rate: ``λ(t0, Δ) = log A(t0, Δ) / Δ`` (per step; > 0 while ε grows).

Both use only the Δ steps after the spawn, so a ghost's sensitivity does not depend on when the run stops —
unlike its final C, D or B, which keep growing for as long as a still-chaotic ghost runs. The chaotic phase is the
range of spawn steps whose ghosts amplify ε strongly; the estimate (:func:`transition_from_sensitivity`) is the
first spawn from which sensitivity over a fixed window has dropped, bracketed by the spawn grid.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .estimate import TransitionEstimate, unavailable

__all__ = ["SeparationCurve", "amplification", "default_windows", "growth_rate", "sensitivity_table",
           "transition_from_sensitivity"]


@dataclass(frozen=True)
class SeparationCurve:
    """One ghost's separation from the run it is compared with (``run.separation(ghost)`` plus its ghost info).

    ``steps`` (int64, increasing) and ``l2`` (float64): ‖θ'_t − θ_ref,t‖₂ after each step the ghost took, the
    first pair at its spawn. ``status``: ``"alive"``, ``"finished"``, ``"diverged"`` (it stopped with non-finite
    values or an exploding norm), ``"failed"`` or ``"interrupted"``.
    """

    ghost: int
    spawn_step: int
    realized_norm: float
    steps: np.ndarray
    l2: np.ndarray
    control: bool = False
    status: str = "alive"

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        l2 = np.asarray(self.l2, dtype=np.float64).reshape(-1)
        if steps.shape != l2.shape:
            raise ValueError(f"steps and l2 must have the same length; got {steps.size} and {l2.size}")
        if steps.size > 1 and not np.all(np.diff(steps) > 0):
            raise ValueError(f"separation steps of ghost {self.ghost} must be strictly increasing")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "l2", l2)

    @property
    def delta(self) -> np.ndarray:
        """δ(t) = l2(t) / realized ‖ε‖ (NaN for the ε = 0 control or a perturbation lost to rounding)."""
        if not self.realized_norm > 0:
            return np.full(self.l2.shape, np.nan)
        return self.l2 / self.realized_norm

    @property
    def span(self) -> int:
        """Steps from the spawn to the last recorded separation (0 without records)."""
        return int(self.steps[-1] - self.spawn_step) if self.steps.size else 0

    def l2_at(self, step: int) -> float:
        """l2 at ``step``: the recorded value, else log-linear interpolation between the recorded neighbours
        (exact for exponential growth; separation is normally recorded at every step, so this only matters for
        thinned curves); NaN outside the recorded range."""
        steps, l2 = self.steps, self.l2
        if steps.size == 0 or step < steps[0] or step > steps[-1]:
            return math.nan
        k = int(np.searchsorted(steps, step))
        if steps[k] == step:
            return float(l2[k])
        a, b = l2[k - 1], l2[k]
        w = (step - steps[k - 1]) / (steps[k] - steps[k - 1])
        if a > 0 and b > 0:
            return float(math.exp((1 - w) * math.log(a) + w * math.log(b)))
        return float((1 - w) * a + w * b)


def amplification(curve: SeparationCurve, window: int) -> float:
    """A(t0, Δ) = δ(t0 + Δ) of ``curve`` for ``window`` = Δ steps.

    NaN when the ghost has not run Δ steps (the run ended first, or it was interrupted) or its ‖ε‖ is 0;
    ``inf`` when it stopped as diverged before t0 + Δ (it amplified ε beyond what could be measured).
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive number of steps; got {window!r}")
    if not curve.realized_norm > 0:
        return math.nan
    target = curve.spawn_step + int(window)
    if curve.steps.size == 0 or target > curve.steps[-1]:
        return math.inf if curve.status == "diverged" else math.nan
    value = curve.l2_at(target)
    if not math.isfinite(value):
        return math.inf if curve.status == "diverged" else math.nan
    return value / curve.realized_norm


def growth_rate(amplification_value: float, window: int) -> float:
    """λ(t0, Δ) = log A / Δ per step (−inf for A = 0; NaN for NaN)."""
    if math.isnan(amplification_value):
        return math.nan
    if amplification_value <= 0:
        return -math.inf
    return math.log(amplification_value) / window


def default_windows(curves: Sequence[SeparationCurve]) -> list[int]:
    """Windows Δ on a 1-2-5 grid (1, 2, 5, 10, 20, 50, …) up to the longest span of a perturbed ghost: the same
    grid for every run, so estimates of runs cut at different horizons use the same windows."""
    longest = max((c.span for c in curves if not c.control), default=0)
    out, k = [], 0
    while True:
        window = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        if window > longest:
            return out
        out.append(window)
        k += 1


def sensitivity_table(curves: Sequence[SeparationCurve], windows: Sequence[int]) -> np.ndarray:
    """A(t0, Δ) for every curve (rows) and window (columns)."""
    return np.array([[amplification(c, int(w)) for w in windows] for c in curves], dtype=np.float64).reshape(
        len(curves), len(windows))


def _noise_floor(control: SeparationCurve | None, step: int) -> float:
    """The control ghost's separation at ``step`` (0 for an exact control; NaN without a record)."""
    if control is None:
        return 0.0
    value = control.l2_at(step)
    return 0.0 if math.isnan(value) else value


def _labels(curves: Sequence[SeparationCurve], window: int, control: SeparationCurve | None,
            resolve_noise: float) -> tuple[np.ndarray, list[str]]:
    """log A per curve at ``window`` and a reason for each NaN (not run long enough, or under the noise floor)."""
    values, notes = [], []
    for c in curves:
        a = amplification(c, window)
        note = ""
        if math.isnan(a):
            note = "not yet Δ steps old"
        elif math.isfinite(a):
            floor = _noise_floor(control, c.spawn_step + window)
            if floor > 0 and a * c.realized_norm < resolve_noise * floor:
                a, note = math.nan, f"within {resolve_noise:g}× the control ghost's separation"
        values.append(math.log(a) if a > 0 else -math.inf if a == 0 else a)
        notes.append(note)
    return np.array(values, dtype=np.float64), notes


def _decide(spawns: list[int], log_a: np.ndarray, threshold: float) -> tuple[int | None, int | None, bool]:
    """(index of the last sensitive spawn, index of the first insensitive spawn after it, monotone)."""
    sensitive = [k for k, a in enumerate(log_a) if not math.isnan(a) and a >= threshold]
    if not sensitive:
        return None, None, True
    last = sensitive[-1]
    after = next((k for k in range(last + 1, len(spawns)) if not math.isnan(log_a[k])), None)
    peak = int(np.nanargmax(np.where(np.isnan(log_a), -np.inf, log_a)))
    monotone = not any(not math.isnan(log_a[k]) and log_a[k] < threshold for k in range(peak, last))
    return last, after, monotone


def transition_from_sensitivity(curves: Sequence[SeparationCurve], *, windows: Sequence[int] | None = None,
                                resolve: float = 1e3, fraction: float = 0.5, late_amplification: float = 10.0,
                                resolve_noise: float = 10.0) -> TransitionEstimate:
    """The chaos estimate: the first spawn step from which ghosts amplify ε much less over a fixed window.

    Rule (every number below is in the evidence and stated in the report):

    1. Windows Δ come from the 1-2-5 grid (or ``windows``), from the smallest one over which some ghost amplifies
       its perturbation at least ``resolve``-fold (A ≥ 10³ by default: chaos is then visible far above the first
       steps' transient, about ×10–50 on real runs, and float rounding). None: ``"undetermined"``.
    2. At a window, a spawn is *sensitive* when log A(t0, Δ) ≥ ``fraction`` · log A_peak, A_peak the largest
       finite amplification at that window (``fraction = 0.5``: A ≥ √A_peak), and *insensitive* below. Ghosts
       that stopped as diverged before Δ count as sensitive; ghosts that have not run Δ steps, or whose
       separation is within ``resolve_noise``× the ε = 0 control's (a vectorized shadow's drift), are
       unresolved. The answer at that window is the first resolved spawn after the last sensitive one (bracket:
       (last sensitive spawn, it]); every resolved spawn sensitive, none unresolved after: a lower bound.
    3. On real runs a ghost's growth is not one exponential: a slow transient, then a burst that comes later for
       later spawns. So the window Δ* is the first window whose answer is the same at the next longer window
       (the evidence lists every window's answer). No two consecutive windows agree: ``"undetermined"``, saying
       what each window gave — later ghosts need to run longer.
    4. Quality ``high`` when sensitivity falls monotonically (no insensitive spawn between the peak and the last
       sensitive one) by ≥ 100× in A from the peak to the estimate; ``medium`` when monotone; ``low`` otherwise.

    Spawns after the drop that still amplify ε at least ``late_amplification``-fold over Δ* (λ > 0) are reported
    as such: weaker chaos is not stability.
    """
    if not resolve > 1 or not 0 < fraction < 1 or not late_amplification > 1 or not resolve_noise >= 1:
        raise ValueError("need resolve > 1, 0 < fraction < 1, late_amplification > 1 and resolve_noise >= 1; got "
                         f"{resolve}, {fraction}, {late_amplification}, {resolve_noise}")
    control = next((c for c in curves if c.control and c.status != "failed"), None)
    perturbed = sorted((c for c in curves if not c.control and c.status != "failed"), key=lambda c: c.spawn_step)
    lost = [c.ghost for c in perturbed if not c.realized_norm > 0]
    perturbed = [c for c in perturbed if c.realized_norm > 0 and c.steps.size]
    if not perturbed:
        return unavailable("chaos", "no perturbed ghost with a separation curve: pass Probe(..., "
                                    "ghosts=dynprobe.Ghosts(at=[...])) and watch the loss"
                           + (f" (ghosts {lost} lost their perturbation to rounding)" if lost else ""))
    grid = sorted(int(w) for w in windows) if windows is not None else default_windows(perturbed)
    table = sensitivity_table(perturbed, grid) if grid else np.zeros((len(perturbed), 0))
    noise = "exactly 0" if control is None or not np.any(control.l2 != 0) else f"up to {np.nanmax(control.l2):.3g}"
    evidence: dict[str, Any] = {
        "windows": grid, "resolve": resolve, "fraction": fraction, "late_amplification": late_amplification,
        "control_separation": noise if control is not None else "no control ghost",
        "curves": [{"ghost": c.ghost, "spawn_step": c.spawn_step, "realized_norm": c.realized_norm,
                    "last_step": int(c.steps[-1]), "status": c.status,
                    "A": [None if math.isnan(a) else a for a in row.tolist()]} for c, row in zip(perturbed, table)],
    }
    resolved = [k for k in range(len(grid)) if np.any(table[:, k] >= resolve)]
    if not resolved:
        best = np.nanmax(np.where(np.isinf(table), np.nan, table)) if np.isfinite(table).any() else math.nan
        return TransitionEstimate(
            "chaos", None, None, "undetermined",
            f"undetermined: no ghost amplified its perturbation ×{resolve:g} within "
            f"{grid[-1] if grid else 0} steps (largest ×{best:.3g}); spawn earlier ghosts or run longer", evidence)
    spawns = [c.spawn_step for c in perturbed]
    outcomes = [_outcome(perturbed, window, control, fraction, resolve_noise) for window in grid[resolved[0]:]]
    evidence["per_window"] = {str(o.window): o.step(spawns) for o in outcomes}
    stable = next((a for a, b in zip(outcomes, outcomes[1:]) if a.kind != "undetermined" and a.key == b.key), None)
    chosen = stable or outcomes[0]
    window, log_a, notes, peak, threshold = chosen.window, chosen.log_a, chosen.notes, chosen.peak, chosen.threshold
    last, first_after, monotone = chosen.last, chosen.after, chosen.monotone
    rows = [{"ghost": c.ghost, "spawn_step": c.spawn_step, "A": None if math.isnan(a) else math.exp(a),
             "lambda": None if math.isnan(a) else a / window, "note": note,
             "sensitive": None if math.isnan(a) else bool(a >= threshold)}
            for c, a, note in zip(perturbed, log_a, notes)]
    evidence.update(window=window, threshold_A=math.exp(threshold), peak_A=math.exp(peak), ghosts=rows,
                    window_stable=stable is not None)
    if last is None:  # unreachable: the peak itself is sensitive
        return TransitionEstimate("chaos", None, None, "undetermined", "undetermined: no sensitive spawn", evidence)
    if stable is None:
        results = "; ".join(f"Δ = {o.window}: {_outcome_text(o, spawns)}" for o in outcomes[:4])
        return TransitionEstimate(
            "chaos", None, (spawns[last], None), "undetermined",
            f"undetermined: the answer depends on the window ({results}) — it must be the same over two "
            "consecutive windows; later ghosts need to run longer", evidence)
    if chosen.kind == "bound":
        return TransitionEstimate(
            "chaos", None, (spawns[last], None), "bound",
            f"every ghost is sensitive over Δ = {window} steps, the last spawned at step {spawns[last]} "
            f"(A ≥ ×{math.exp(threshold):.3g}): the chaotic phase lasts beyond it — spawn later ghosts", evidence)
    step, low = spawns[first_after], spawns[last]
    contrast = math.exp(peak - log_a[first_after]) if math.isfinite(log_a[first_after]) else math.inf
    quality = "high" if monotone and contrast >= 100 else "medium" if monotone else "low"
    late = _late_growth(perturbed[first_after:], log_a[first_after:], window, grid, late_amplification)
    evidence.update(contrast=contrast, monotone=monotone, late_growth=late)
    a_after = math.exp(log_a[first_after]) if math.isfinite(log_a[first_after]) else 0.0
    grows = f"×{math.exp(log_a[last]):.3g}" if math.isfinite(log_a[last]) else "until it diverges"
    summary = (f"over Δ = {window} steps after their spawn, the ghost spawned at {low} still amplifies ε "
               f"{grows} (sensitive: A ≥ ×{math.exp(threshold):.3g}, from the largest ×{math.exp(peak):.3g}), "
               f"the ghost spawned at {step} only ×{a_after:.3g}: sensitivity drops between steps {low} and {step}")
    if not monotone:
        summary += " (not monotone: an insensitive spawn precedes a sensitive one)"
    if late:
        worst = max(late, key=lambda r: r["lambda"])
        summary += (f"; later spawns still amplify ε (×{worst['A']:.3g} over {worst['window']} steps from "
                    f"{worst['spawn_step']}, λ = {worst['lambda']:.3g}/step > 0): weaker chaos, not stability")
    return TransitionEstimate("chaos", step, (low, step), quality, summary, evidence)


@dataclass(frozen=True)
class _Outcome:
    """The rule applied at one window: labels, the last sensitive and first insensitive spawn after it."""

    window: int
    log_a: np.ndarray
    notes: list[str]
    peak: float
    threshold: float
    last: int | None
    after: int | None
    monotone: bool
    kind: str  # "estimate", "bound" (every resolved spawn sensitive), "undetermined"

    @property
    def key(self) -> tuple[str, int | None, int | None]:
        return self.kind, self.last, self.after

    def step(self, spawns: list[int]) -> int | None:
        return spawns[self.after] if self.kind == "estimate" and self.after is not None else None


def _outcome(curves: Sequence[SeparationCurve], window: int, control: SeparationCurve | None, fraction: float,
             resolve_noise: float) -> _Outcome:
    log_a, notes = _labels(curves, window, control, resolve_noise)
    finite = log_a[np.isfinite(log_a)]
    peak = float(finite.max()) if finite.size else math.inf
    threshold = fraction * peak if finite.size else math.inf
    last, after, monotone = _decide([c.spawn_step for c in curves], log_a, threshold)
    unresolved_after = last is not None and any(math.isnan(log_a[k]) for k in range(last + 1, len(curves)))
    if last is None or not finite.size:
        kind = "undetermined"
    elif after is not None:
        kind = "estimate"
    else:
        kind = "undetermined" if unresolved_after else "bound"
    return _Outcome(window, log_a, notes, peak, threshold, last, after, monotone, kind)


def _outcome_text(outcome: _Outcome, spawns: list[int]) -> str:
    if outcome.kind == "estimate":
        return f"drop between {spawns[outcome.last]} and {spawns[outcome.after]}"  # type: ignore[index]
    if outcome.kind == "bound":
        return "every ghost sensitive"
    reasons: dict[str, list[int]] = {}
    for k, spawn in enumerate(spawns):
        if math.isnan(outcome.log_a[k]):
            reasons.setdefault(outcome.notes[k] or "not resolved", []).append(spawn)
    return ", ".join(f"ghosts spawned at {_steps_text(steps)}: {why}" for why, steps in reasons.items()) or \
        "not resolved"


def _late_growth(curves: Sequence[SeparationCurve], log_a: np.ndarray, window: int, grid: Sequence[int],
                 late_amplification: float) -> list[dict[str, Any]]:
    """Spawns after the drop whose ghosts still amplify ε ≥ ``late_amplification``-fold, at Δ* or at the longest
    window of the grid they have run (the growth rate is best measured over long windows)."""
    out = []
    for c, a in zip(curves, log_a):
        longest = max((w for w in grid if math.isfinite(amplification(c, w))), default=None)
        candidates = [(window, math.exp(a))] if math.isfinite(a) else []
        if longest is not None and longest != window:
            candidates.append((longest, amplification(c, longest)))
        for w, value in candidates:
            if value >= late_amplification:
                out.append({"ghost": c.ghost, "spawn_step": c.spawn_step, "window": w, "A": value,
                            "lambda": math.log(value) / w})
                break
    return out


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps[:6]) + (" …" if len(steps) > 6 else "")
