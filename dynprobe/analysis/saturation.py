"""Does a tiny perturbation change where training ends up? The ``"chaos"`` estimate, read off each ghost's outcome.

The two-phase paper's Finding I / Conjecture I (§4, Fig. 3): a ghost perturbed by ε at t0 in the chaotic phase ends
up far from the unperturbed run (large C, B and D at t1), one perturbed after the inflection point stays in the same
basin. SGD amplifies ε in *both* phases (a late ghost's separation still grows 10²–10⁶-fold); what changes at the
transition is where that growth stops: a late ghost's separation *saturates* orders of magnitude below the level the
early ghosts reach. So the estimate reads, for every ghost, its separation curve l2(t) = ‖θ'_t − θ_t‖₂ (recorded
after every step):

* **plateau level** ``level`` = the median of l2 over the last ``tail_fraction`` (10 %) of the ghost's life — the
  separation where it ended up (all ghosts alive to the end are compared at the same final step);
* **growth** = ``level`` ÷ the median of l2 over the same-length window that ends ``plateau_fraction`` (½) of its
  life earlier; the ghost is **saturated** when growth ≤ ``plateau_factor`` (×3): its separation changed less than
  3-fold over the last half of its life. Measured: ghosts that settled in the main run's basin but drift slowly
  grew ×1.8–2.1 over the last half of a 3,200-step life (``tests/science`` setting ``mlp_sgdm``), while a ghost
  still on its way to the chaotic level grew ×5.3 over 800 steps (the CNN with BatchNorm at a constant lr 0.1,
  which reached the chaotic level by twice that horizon). A ghost that stopped as diverged is on the chaotic level.

Spawns are compared with the **chaotic level** L* = the largest finite per-spawn median level (the early spawns').
A ghost is *high* when its level is ≥ L*/K and *low* when it is more than ``K``-fold below (K = ``level_ratio`` =
10 in L2, about 100 in 1 − cos, which scales as L2²). With several perturbation directions per spawn
(``Ghosts(directions=k)``) a spawn is high or low when all its directions are; one whose directions straddle L*/K
widens the bracket. The transition is bracketed by the last all-high spawn and the first all-low spawn after every
spawn with a high direction: ``(last chaotic spawn, first stable spawn]``, the estimate being the latter.

The bracket is decided only by saturated ghosts: when a direction of the first low spawn is still growing at the end
of the run it might yet reach the chaotic level, and the answer is "undetermined: … still growing at the end of the
run (×g over the last n steps)", never a step. A later low spawn that still grows does not undo a bracket its
earlier, saturated neighbour decides. Without any low spawn there is no contrast to read: when the ghosts'
verdicts (:mod:`.verdicts`: D and the linear-reference barrier against measured scales) say every ghost diverged,
the chaotic phase lasts beyond the last spawn (a bound); when every ghost is close, it ended before the first;
otherwise undetermined.

Amplification over fixed windows (:mod:`.sensitivity`) is kept as evidence only: over short windows a later spawn
caught by a burst of the main run can look *more* sensitive than an earlier one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .estimate import TransitionEstimate, unavailable
from .sensitivity import SeparationCurve, default_windows, sensitivity_table

__all__ = ["GhostPlateau", "ghost_plateau", "transition_from_saturation"]

#: Defaults of the rule (each is stated in the estimate's evidence and the report).
LEVEL_RATIO = 10.0
PLATEAU_FACTOR = 3.0
PLATEAU_FRACTION = 0.5
TAIL_FRACTION = 0.1
MIN_LIFE = 20


@dataclass(frozen=True)
class GhostPlateau:
    """Where one ghost's separation ended up (see the module docstring).

    ``level``: median l2 over the last ``tail_fraction`` of its life (``inf`` for a ghost that stopped as diverged);
    ``growth``: level ÷ the level ``plateau_fraction`` of its life earlier, over ``window`` steps (NaN for a ghost
    too young to tell); ``saturated``: growth ≤ the plateau factor; ``amplification``: level ÷ realized ‖ε‖.
    """

    ghost: int
    spawn_step: int
    final_step: int
    level: float
    growth: float
    window: int
    saturated: bool
    amplification: float
    status: str

    @property
    def resolved(self) -> bool:
        """Whether the ghost has a level to compare (it ran long enough or stopped as diverged)."""
        return not math.isnan(self.level)

    def to_dict(self) -> dict[str, Any]:
        return {"ghost": self.ghost, "spawn_step": self.spawn_step, "final_step": self.final_step,
                "level_L2": _json(self.level), "growth": _json(self.growth), "growth_window": self.window,
                "saturated": self.saturated, "amplification": _json(self.amplification), "status": self.status}


def _json(value: float) -> float | str | None:
    return None if math.isnan(value) else ("inf" if math.isinf(value) else float(value))


def ghost_plateau(curve: SeparationCurve, *, plateau_factor: float = PLATEAU_FACTOR,
                  plateau_fraction: float = PLATEAU_FRACTION, tail_fraction: float = TAIL_FRACTION,
                  min_life: int = MIN_LIFE) -> GhostPlateau:
    """The plateau level, growth and saturation of one ghost's separation curve (see the module docstring)."""
    steps, l2 = curve.steps, curve.l2
    final = int(steps[-1]) if steps.size else curve.spawn_step
    if curve.status == "diverged":
        return GhostPlateau(curve.ghost, curve.spawn_step, final, math.inf, math.inf, 0, True, math.inf,
                            curve.status)
    keep = np.isfinite(l2)
    steps, l2 = steps[keep], l2[keep]
    life = int(steps[-1]) - curve.spawn_step if steps.size else 0
    if life < min_life or steps.size < 4:
        return GhostPlateau(curve.ghost, curve.spawn_step, final, math.nan, math.nan, 0, False, math.nan,
                            curve.status)
    window = max(int(math.ceil(tail_fraction * life)), 1)
    end = int(steps[-1])
    level = float(np.median(l2[steps > end - window]))
    earlier_end = end - int(round(plateau_fraction * life))
    earlier = l2[(steps > earlier_end - window) & (steps <= earlier_end)]
    if earlier.size == 0:  # a thinned curve: the recorded value nearest before that point
        earlier = l2[steps <= earlier_end][-1:]
    base = float(np.median(earlier))
    growth = level / base if base > 0 else (math.inf if level > 0 else 1.0)
    amplification = level / curve.realized_norm if curve.realized_norm > 0 else math.nan
    return GhostPlateau(curve.ghost, curve.spawn_step, end, level, growth, end - earlier_end,
                        bool(growth <= plateau_factor), amplification, curve.status)


@dataclass(frozen=True)
class _Spawn:
    """The ghosts of one spawn step (one per perturbation direction) and their classes."""

    step: int
    plateaus: tuple[GhostPlateau, ...]
    high: tuple[bool, ...]

    @property
    def median_level(self) -> float:
        return float(np.median([p.level for p in self.plateaus]))

    @property
    def all_high(self) -> bool:
        return all(self.high)

    @property
    def any_high(self) -> bool:
        return any(self.high)

    @property
    def saturated(self) -> bool:
        return all(p.saturated for p in self.plateaus)


def transition_from_saturation(curves: Sequence[SeparationCurve], *, verdicts: Mapping[int, str] | None = None,
                               outcomes: Mapping[int, Mapping[str, Any]] | None = None,
                               level_ratio: float = LEVEL_RATIO, plateau_factor: float = PLATEAU_FACTOR,
                               plateau_fraction: float = PLATEAU_FRACTION, tail_fraction: float = TAIL_FRACTION,
                               min_life: int = MIN_LIFE) -> TransitionEstimate:
    """The chaos estimate: the first spawn from which every ghost saturates ≥ ``level_ratio``-fold below the chaotic
    level (see the module docstring for the rule).

    Args:
        curves: every ghost's separation curve (the ε = 0 control and failed ghosts are left out here).
        verdicts: ghost id → ``"diverged"``/``"close"``/``"borderline"`` at its last comparison
            (:func:`dynprobe.analysis.ghost_verdicts`), used only when no spawn is low (no contrast to read).
        outcomes: ghost id → end-of-run values shown as evidence (``C`` = 1 − cos, ``D``, ``B_linear``).
        level_ratio: K, the factor in L2 below the chaotic level that makes a ghost low.
        plateau_factor: saturated = L2 grew at most ``plateau_factor``-fold over the last ``plateau_fraction``
            of the ghost's life.
        plateau_fraction: the share of its life over which the growth is measured.
        tail_fraction: the share of its life over which a ghost's level is the median l2.
        min_life: ghosts younger than this many steps are not judged.
    """
    if not level_ratio > 1 or not plateau_factor >= 1 or not 0 < plateau_fraction < 1 or \
            not 0 < tail_fraction <= plateau_fraction or isinstance(min_life, bool) or min_life < 1:
        raise ValueError("need level_ratio > 1, plateau_factor >= 1, 0 < tail_fraction <= plateau_fraction < 1 and "
                         f"min_life >= 1; got {level_ratio}, {plateau_factor}, {tail_fraction}, {plateau_fraction}, "
                         f"{min_life}")
    perturbed = sorted((c for c in curves if not c.control and c.status != "failed"),
                       key=lambda c: (c.spawn_step, c.ghost))
    lost = [c.ghost for c in perturbed if not c.realized_norm > 0]
    perturbed = [c for c in perturbed if c.realized_norm > 0 and c.steps.size]
    if not perturbed:
        return unavailable("chaos", "no perturbed ghost with a separation curve: pass Probe(..., "
                                    "ghosts=dynprobe.Ghosts(at=[...])) and watch the loss"
                           + (f" (ghosts {lost} lost their perturbation to rounding)" if lost else ""))
    plateaus = [ghost_plateau(c, plateau_factor=plateau_factor, plateau_fraction=plateau_fraction,
                              tail_fraction=tail_fraction, min_life=min_life) for c in perturbed]
    outcomes = outcomes or {}
    windows = default_windows(perturbed)
    table = sensitivity_table(perturbed, windows) if windows else np.zeros((len(perturbed), 0))
    evidence: dict[str, Any] = {
        "rule": {"level_ratio": level_ratio, "plateau_factor": plateau_factor, "plateau_fraction": plateau_fraction,
                 "tail_fraction": tail_fraction, "min_life": min_life},
        "ghosts": [{**p.to_dict(), **{k: _json(float(v)) for k, v in outcomes.get(p.ghost, {}).items()
                                      if v is not None}} for p in plateaus],
        "amplification": {"windows": windows, "A": {str(c.ghost): [_json(a) for a in row.tolist()]
                                                    for c, row in zip(perturbed, table)}},
    }
    young = [p for p in plateaus if not p.resolved]
    resolved = [p for p in plateaus if p.resolved]
    if not resolved:
        return TransitionEstimate("chaos", None, None, "undetermined",
                                  f"undetermined: every ghost has run fewer than {min_life} steps", evidence)
    by_step: dict[int, list[GhostPlateau]] = {}
    for p in resolved:
        by_step.setdefault(p.spawn_step, []).append(p)
    medians = [float(np.median([p.level for p in group])) for group in by_step.values()]
    finite = [m for m in medians if math.isfinite(m)]  # a diverged ghost is on the chaotic level, not its measure
    chaotic_level = max(finite) if finite else math.inf
    threshold = chaotic_level / level_ratio
    spawns = [_Spawn(step, tuple(group), tuple(bool(p.level >= threshold) for p in group))
              for step, group in sorted(by_step.items())]
    for row in evidence["ghosts"]:
        p = next(q for q in plateaus if q.ghost == row["ghost"])
        row["class"] = "unresolved" if not p.resolved else "high" if p.level >= threshold else "low"
    evidence.update(chaotic_level=_json(chaotic_level), threshold_L2=_json(threshold),
                    spawns=[{"step": s.step, "directions": len(s.plateaus), "median_level": _json(s.median_level),
                             "high": list(s.high), "saturated": s.saturated} for s in spawns])
    if young:
        evidence["unresolved"] = [p.ghost for p in young]
    last_any_high = max(k for k, s in enumerate(spawns) if s.any_high)
    pending = sorted({p.spawn_step for p in young if p.spawn_step > spawns[last_any_high].step})
    if last_any_high == len(spawns) - 1 and pending:
        return TransitionEstimate(
            "chaos", None, (spawns[-1].step, None), "undetermined",
            f"undetermined: {_on_level(spawns)} end up on the chaotic level so far, one spawned last (step "
            f"{spawns[-1].step}) among them, and the ghosts spawned at {_steps_text(pending)} have run fewer than "
            f"{min_life} steps: run longer", evidence)
    if all(s.any_high for s in spawns):
        return _without_contrast(spawns, verdicts, chaotic_level, evidence)
    if last_any_high == len(spawns) - 1:
        low = [s.step for s in spawns if not s.any_high]
        return TransitionEstimate(
            "chaos", None, (spawns[-1].step, None), "bound",
            f"the ghosts spawned last, at step {spawns[-1].step}, still end up on the chaotic level (L2 ≈ "
            f"{chaotic_level:.3g}): the chaotic phase lasts beyond it — spawn later ghosts (not monotone: the ghosts "
            f"spawned at {_steps_text(low)} end up ≥ ×{level_ratio:g} lower)", evidence)
    first_low = spawns[last_any_high + 1]
    low_at = last_any_high
    while low_at >= 0 and not spawns[low_at].all_high:
        low_at -= 1
    low_step = spawns[low_at].step if low_at >= 0 else None
    growing = [p for p in first_low.plateaus if not p.saturated]
    if growing:
        worst = max(growing, key=lambda p: p.growth)
        return TransitionEstimate(
            "chaos", None, (low_step if low_step is not None else spawns[0].step, None), "undetermined",
            f"undetermined: the ghosts spawned at {first_low.step} are below the chaotic level but still growing at "
            f"the end of the run (×{worst.growth:.3g} over the last {worst.window} steps, more than "
            f"×{plateau_factor:g}): run longer to see where they saturate", evidence)
    straddle = [s.step for s in spawns[low_at + 1:last_any_high + 1]]
    non_monotone = any(not s.any_high for s in spawns[:last_any_high])
    stable_level = max(p.level for p in first_low.plateaus)
    contrast = chaotic_level / stable_level if stable_level > 0 else math.inf
    quality = ("high" if not straddle and not non_monotone and contrast >= level_ratio ** 2 else
               "medium" if not non_monotone else "low")
    later_growing = [p for s in spawns[last_any_high + 2:] for p in s.plateaus if not p.saturated]
    evidence.update(contrast=_json(contrast), straddling=straddle, non_monotone=non_monotone,
                    later_still_growing=[{"ghost": p.ghost, "spawn_step": p.spawn_step, "growth": _json(p.growth),
                                          "level_L2": _json(p.level)} for p in later_growing])
    step = first_low.step
    end = max(p.final_step for p in first_low.plateaus)
    cos = _outcome_range(first_low.plateaus, outcomes, "C")
    summary = (f"ghosts spawned at step ≤ {low_step if low_step is not None else '?'} end up on the chaotic level "
               f"(L2 ≈ {chaotic_level:.3g}); from step {step} on, every ghost saturates at least ×{level_ratio:g} "
               f"lower (L2 ≤ {stable_level:.3g} at step {end}, ×{contrast:.3g} below"
               + (f"; 1 − cos {cos}" if cos else "") + "): the transition lies between steps "
               f"{low_step if low_step is not None else spawns[0].step} and {step}")
    if straddle:
        summary += (f" (widened: the directions of the ghosts spawned at {_steps_text(straddle)} straddle the "
                    f"threshold ×{level_ratio:g} below the chaotic level)")
    if non_monotone:
        summary += " (not monotone: a low spawn precedes a chaotic one)"
    if later_growing:
        summary += (f"; ghosts spawned at {_steps_text(sorted({p.spawn_step for p in later_growing}))} still grow "
                    "slowly but stay far below the chaotic level")
    interval = (low_step if low_step is not None else spawns[0].step, step)
    return TransitionEstimate("chaos", step, interval, quality, summary, evidence)


def _without_contrast(spawns: list[_Spawn], verdicts: Mapping[int, str] | None,
                      chaotic_level: float, evidence: dict[str, Any]) -> TransitionEstimate:
    """No spawn below the chaotic level: every ghost ends up on one level; its verdicts say which."""
    growing = [p for s in spawns for p in s.plateaus if not p.saturated]
    said = [verdicts.get(p.ghost) for s in spawns for p in s.plateaus] if verdicts else []
    evidence["verdicts"] = said
    first, last = spawns[0].step, spawns[-1].step
    if said and all(v == "diverged" for v in said):
        return TransitionEstimate(
            "chaos", None, (last, None), "bound",
            f"{_on_level(spawns)}, one spawned last (step {last}) among them, end up on the chaotic level (L2 ≈ "
            f"{chaotic_level:.3g}) and every ghost diverged from the main run (D or the linear-reference barrier "
            "above its measured scale): the chaotic phase lasts beyond the last spawn — spawn later ghosts", evidence)
    if said and all(v == "close" for v in said) and not growing:
        return TransitionEstimate(
            "chaos", None, (None, first), "bound",
            f"{_on_level(spawns)}, one spawned first (step {first}) among them, saturate on one level (L2 ≈ "
            f"{chaotic_level:.3g}) and every ghost stays close to the main run: the chaotic phase ended before the "
            "first spawn — spawn earlier ghosts", evidence)
    if growing:
        worst = max(growing, key=lambda p: p.growth)
        return TransitionEstimate(
            "chaos", None, None, "undetermined",
            f"undetermined: no spawn ends up below the others yet, and ghosts spawned at "
            f"{_steps_text(sorted({p.spawn_step for p in growing}))} are still growing at the end of the run "
            f"(×{worst.growth:.3g} over the last {worst.window} steps): run longer or spawn later ghosts", evidence)
    return TransitionEstimate(
        "chaos", None, None, "undetermined",
        f"undetermined: every spawn has ghosts on one level (L2 ≈ {chaotic_level:.3g}; {_on_level(spawns)}), so "
        "there is no drop to locate, and their verdicts do not say whether that level is chaotic"
        + ("" if verdicts else " (no D or barrier to compare with)"), evidence)


def _outcome_range(plateaus: Sequence[GhostPlateau], outcomes: Mapping[int, Mapping[str, Any]], key: str) -> str:
    values = [float(outcomes[p.ghost][key]) for p in plateaus
              if p.ghost in outcomes and outcomes[p.ghost].get(key) is not None
              and math.isfinite(float(outcomes[p.ghost][key]))]
    if not values:
        return ""
    low, high = min(values), max(values)
    return f"{high:.3g}" if low == high else f"{low:.3g}–{high:.3g}"


def _on_level(spawns: Sequence[_Spawn]) -> str:
    """How many ghosts are on the chaotic level, counted: ``"all 6 ghosts"`` or ``"2 of 6 ghosts"``."""
    high = sum(sum(s.high) for s in spawns)
    total = sum(len(s.high) for s in spawns)
    return f"all {total} ghosts" if high == total else f"{high} of {total} ghosts"


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps[:6]) + (" …" if len(steps) > 6 else "")
