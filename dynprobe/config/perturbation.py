"""``Perturbation``: how a ghost is perturbed at its spawn step (θ' = θ + ε)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from dynprobe._util.checks import is_int

__all__ = ["KINDS", "MAX_ULPS", "Perturbation"]

KINDS = ("l2", "per_coord", "relative", "ulp", "single_coord")
MAX_ULPS = 2**52  # kind="ulp": norms stay exact integers, and the closed-form move cannot overflow int64 keys


@dataclass(frozen=True)
class Perturbation:
    """How to perturb a ghost at its spawn step: θ' = θ + ε over all perturbed tensors.

    ``norm`` means, per ``kind``:

    * ``"l2"`` (default; the paper's reading, used for reproductions): ε = norm · z / ‖z‖₂ with z standard
      Gaussian over all perturbed coordinates, so ‖ε‖₂ = norm.
    * ``"per_coord"``: ε_i = norm · z_i, i.e. the per-coordinate standard deviation (‖ε‖₂ ≈ norm · √P).
    * ``"relative"``: a Gaussian direction scaled to ‖ε‖₂ = norm · ‖θ‖₂ (θ over all perturbed tensors).
    * ``"ulp"``: every coordinate moves by exactly ``norm`` units in the last place of its own dtype, each with
      a random sign (what ``torch.nextafter`` applied ``norm`` times gives, computed in closed form; zeros move to
      ±``norm`` smallest subnormals; saturating at ±inf). ``norm`` must be a whole number up to ``2**52``.
      This is the smallest dense perturbation that survives float rounding everywhere, and its size is known
      exactly (in float32, 1 ulp per coordinate of a ResNet-20 is ‖δ‖ ≈ 4e-6).
    * ``"single_coord"``: ``norm`` is added to one coordinate chosen uniformly at random among all perturbed
      coordinates (cf. Summers & Dinneen 2021, one-bit changes to one weight).

    ``norm=0`` is the ε = 0 control for every kind: the tensors are left bitwise unchanged. ``seed`` seeds the
    private generator that draws the direction, signs or coordinate.
    """

    norm: float = 1e-7
    kind: str = "l2"
    seed: int = 0

    def __post_init__(self) -> None:
        norm, kind, seed = self.norm, self.kind, self.seed
        if kind not in KINDS:
            raise ValueError(f"Perturbation kind must be one of {KINDS!r}; got {kind!r}")
        if isinstance(norm, bool) or not isinstance(norm, numbers.Real):
            raise TypeError(f"Perturbation norm must be a real number; got {norm!r}")
        if math.isnan(norm) or math.isinf(norm) or norm < 0:
            raise ValueError(f"Perturbation norm must be finite and >= 0 (0 is the control ghost); got {norm!r}")
        if kind == "ulp" and not float(norm).is_integer():
            raise ValueError(
                f"Perturbation kind='ulp' takes norm as a whole number of units in the last place (1, 2, ...); "
                f"got {norm!r}"
            )
        if kind == "ulp" and norm > MAX_ULPS:
            raise ValueError(
                f"Perturbation kind='ulp' takes at most 2**52 units in the last place; got {norm!r}. A perturbation "
                "that large spans many binades: use kind='relative' (‖ε‖ = norm·‖θ‖) instead"
            )
        if not is_int(seed) or not 0 <= seed < 2**64:
            raise ValueError(f"Perturbation seed must be an integer in [0, 2**64); got {seed!r}")
        object.__setattr__(self, "norm", float(norm))
        object.__setattr__(self, "seed", int(seed))
