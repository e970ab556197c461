"""The ghost's perturbation θ' = θ + ε (§4 of the two-phase paper), and an honest account of what survived rounding.

The paper perturbs by "‖ε‖₀ = 10⁻⁷", most likely a typo for ‖ε‖₂ = 10⁻⁷. In float32 that is far below the spacing
of the weights: on a ResNet-20 at Kaiming init (median |θ| 0.045, median ulp 3.7e-9) a Gaussian ε of L2 norm 1e-7
has a per-coordinate rms of 1.9e-10, so ~95% of the coordinates round back to their old value and the realized
perturbation δ = fl(θ + ε) − θ keeps only ~38% of the norm (``tests/ghosts/test_perturbation.py`` checks it).
What survives is a sparse set of ±1-ulp flips, mostly on near-zero weights; weights that are exactly zero (BN
shifts and biases at init) absorb their share of ε exactly. A ghost must therefore be described by δ, not by ε:
:func:`perturb_` returns a :class:`PerturbationReport` with both.

Randomness comes from a private ``torch.Generator`` on CPU seeded with ``Perturbation.seed`` (the same seed gives
the same ε on any device); the global RNG streams are never touched.

**Sharded tensors (FSDP2).** With ``shards=`` (:class:`Shards`) each tensor is this rank's shard of a larger one:
every rank draws ε for the *whole* tensor, one tensor at a time (the same stream, so the same ε as one process
perturbing the unsharded model), keeps its own part, and the report's sums are added over the ranks — rank r's
shards of a ghost are then bit for bit rank r's part of the ghost one process would have made.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dynprobe.config import KINDS, Perturbation

__all__ = ["KINDS", "Perturbation", "PerturbationReport", "Shards", "add_ulps", "perturb_"]

# Lower-precision compute dtypes an autocast forward may use (see PerturbationReport.changed_at).
_LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# When the rounding warning fires. Every analysis reads a ghost by its realized ‖δ‖ (amplification = separation /
# ‖δ‖), so losing part of ε to rounding is harmless: the default 1e-7 keeps 85 % on the test MLP and 38 % on a
# float32 ResNet-20, and a warning on every such run read as noise. It matters when the ghost is effectively
# unperturbed: δ more than an order of magnitude below the ε asked for, or so sparse that under 1 % of the
# coordinates moved (the share below which the autocast check calls a perturbation invisible). Measured with l2
# perturbations: 1e-9 keeps 11.5 % on the MLP but moves 8 of 1,893 coordinates (warned), 1e-8 on the ResNet-20
# keeps 13 % and moves 0.7 % (warned); 1e-8 on the MLP moves 2 % (not warned).
MIN_REALIZED_FRACTION = 0.1
MIN_CHANGED_SHARE = 0.01


@dataclass(frozen=True)
class PerturbationReport:
    """What :func:`perturb_` intended and what the float add actually did.

    * ``nominal_norm``: ‖ε‖₂ of the intended perturbation, in float64, before the add (for ``"ulp"`` the exact
      k-ulp step, so nominal = realized).
    * ``realized_norm``: ‖δ‖₂ with δ = θ' − θ computed in float64 after the add (exact: θ' and θ are floats of
      the tensor's dtype within a factor 2 of each other, so their float64 difference has no rounding error).
    * ``changed`` of ``total`` coordinates have a different value after the add (a −0.0 that became +0.0
      does not count).
    * ``direction_cosine``: cos(δ, ε) in float64 (1 for ``"ulp"``; ~0.3 for a 1e-7 ``"l2"`` perturbation of
      a float32 ResNet-20); NaN when nothing survived.
    * ``share_on_zeros``: share of ‖δ‖² carried by coordinates that were exactly 0 before the add (BN shifts
      and biases at init take a tiny ε exactly); NaN when nothing survived.
    * ``changed_at``: per lower-precision compute dtype (``"bfloat16"``, ``"float16"``; for tensors wider than
      it), how many coordinates round to a different value of that dtype after the add: what an autocast forward
      in that dtype can see of the perturbation.
    """

    kind: str
    nominal_norm: float
    realized_norm: float
    changed: int
    total: int
    direction_cosine: float
    share_on_zeros: float
    perturbation: Perturbation
    changed_at: dict[str, int] = field(default_factory=dict)

    @property
    def survived(self) -> bool:
        """Whether any part of ε survived the float add (``realized_norm > 0``)."""
        return self.realized_norm > 0

    @property
    def realized_fraction(self) -> float:
        """``realized_norm / nominal_norm`` (NaN for the ε = 0 control)."""
        return self.realized_norm / self.nominal_norm if self.nominal_norm > 0 else math.nan

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.total

    def warning(self, min_fraction: float = MIN_REALIZED_FRACTION,
                min_changed: float = MIN_CHANGED_SHARE) -> str | None:
        """A message when nothing survived, when less than ``min_fraction`` of the nominal norm did, or when fewer
        than ``min_changed`` of the coordinates changed (the ghost is effectively unperturbed; see
        :data:`MIN_REALIZED_FRACTION`); else None.

        The ε = 0 control (``norm=0``) never warns. The caller decides whether to emit it (``warnings.warn``).
        """
        if self.perturbation.norm == 0:
            return None
        if not self.survived:
            return (
                f"the {self.kind!r} perturbation of nominal norm {self.nominal_norm:.3g} did not survive float "
                f"rounding: all {self.total} coordinates rounded back to their old values, so this ghost starts "
                "bit-identical to the main run and can only look stable. Use kind='ulp' (every coordinate moves "
                "by k units in the last place), kind='relative', or a larger norm"
            )
        sparse = self.kind != "single_coord" and self.changed_fraction < min_changed  # one coordinate by design
        if self.realized_fraction < min_fraction or sparse:
            return (
                f"only {self.realized_fraction:.1%} of the {self.kind!r} perturbation's nominal norm survived float "
                f"rounding, on {self.changed_fraction:.2%} of the coordinates: the ghost is effectively unperturbed "
                f"(realized {self.realized_norm:.3g} of {self.nominal_norm:.3g}; {self.changed} of "
                f"{self.total} coordinates changed, {self.share_on_zeros:.0%} of the realized ‖δ‖² on weights that "
                "were exactly zero). Use a larger norm, or kind='ulp' for the smallest dense perturbation"
            )
        return None

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether this is the perturbation a ``ghost_spawn`` record describes (bitwise: the same θ_t and ε), for a
        ghost a resumed run re-creates at its spawn step."""
        return (record.get("realized_norm") == self.realized_norm and record.get("changed") == self.changed
                and record.get("kind") == self.kind)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable fields (the perturbation as a nested dict)."""
        return asdict(self)


@dataclass(frozen=True)
class Shards:
    """The perturbed tensors are this rank's shards of larger tensors (FSDP2 ``fully_shard``).

    ``shapes``: each whole tensor's shape; ``local``: ``(tensor index, a whole-shape tensor) → this rank's part`` (a
    view or copy with the shard's shape); ``all_reduce``: SUM over the ranks, in place, of a CPU float64 tensor."""

    shapes: Sequence[torch.Size]
    local: Callable[[int, torch.Tensor], torch.Tensor]
    all_reduce: Callable[[torch.Tensor], None]


def perturb_(tensors: Iterable[torch.Tensor], perturbation: Perturbation, *,
             shards: Shards | None = None) -> PerturbationReport:
    """Add ε to ``tensors`` in place (under ``no_grad``) and report the realized perturbation.

    ``tensors``: distinct floating-point tensors (any devices, dtypes and shapes), e.g. a ghost's trainable
    parameters. ε is drawn over their concatenation (the tensors in the given order, each in row-major order
    whatever its memory layout) from a CPU generator seeded with ``perturbation.seed``. Gaussian kinds draw ε
    in float64, form θ + ε in float64 and round it to the tensor's dtype. Peak extra memory is a few float64
    copies of the largest tensor. ``shards``: the tensors are this rank's shards (:class:`Shards`, module
    docstring); every rank must call this with the same ``perturbation``.
    """
    if not isinstance(perturbation, Perturbation):
        raise TypeError(f"perturbation must be a dynprobe.Perturbation; got {type(perturbation).__name__}")
    tensors = _check_tensors(tensors, allow_empty=shards is not None)
    layout = _Layout(tensors, shards)
    tally = _Tally()
    if perturbation.norm > 0:  # norm == 0: no add at all, so even -0.0 keeps its sign bit
        generator = torch.Generator(device="cpu").manual_seed(perturbation.seed)
        with torch.no_grad():
            if perturbation.kind == "ulp":
                _add_ulps(layout, int(perturbation.norm), generator, tally)
            elif perturbation.kind == "single_coord":
                _add_to_one_coordinate(layout, perturbation.norm, generator, tally)
            else:
                for tensor, eps in zip(tensors, _gaussian_eps(layout, perturbation, generator)):
                    before = tensor.detach().to(torch.float64, copy=True)
                    eps = eps.to(tensor.device)
                    tensor.copy_(before + eps)
                    tally.add(tensor, before, eps)
    return tally.report(perturbation, layout.total, shards.all_reduce if shards is not None else None)


class _Layout:
    """The perturbed tensors and the whole tensors ε is drawn for: the same ones on one process; under
    :class:`Shards`, the whole tensors' shapes and each rank's part of a whole-shape draw."""

    def __init__(self, tensors: list[torch.Tensor], shards: Shards | None) -> None:
        self.tensors, self.shards = tensors, shards
        self.shapes = [t.shape for t in tensors] if shards is None else [torch.Size(s) for s in shards.shapes]
        self.total = sum(math.prod(shape) for shape in self.shapes)

    def local(self, index: int, whole: torch.Tensor) -> torch.Tensor:
        """This process's part of a whole-shape draw for tensor ``index``."""
        return whole if self.shards is None else self.shards.local(index, whole)

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (itself on one process)."""
        if self.shards is None:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        self.shards.all_reduce(total)
        return float(total[0])


def _check_tensors(tensors: Iterable[torch.Tensor], *, allow_empty: bool = False) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    try:
        tensors = list(tensors)
    except TypeError as error:
        raise TypeError(f"tensors must be a sequence of tensors; got {type(tensors).__name__}") from error
    seen: set[int] = set()
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{index}] must be a torch.Tensor; got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"tensors[{index}] must be floating point to be perturbed; got dtype {tensor.dtype}")
        key = tensor.data_ptr()
        if tensor.numel() and key in seen:
            raise ValueError(
                f"tensors[{index}] appears twice (tied weights?): it would be perturbed twice; pass it once"
            )
        seen.add(key)
    if not any(t.numel() for t in tensors) and not (allow_empty and tensors):  # a rank may hold no coordinates
        raise ValueError("tensors hold no coordinates to perturb (an empty list, or only empty tensors)")
    return tensors


def _gaussian_eps(layout: _Layout, perturbation: Perturbation, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Per-tensor float64 CPU ε for the Gaussian kinds (``l2``, ``per_coord``, ``relative``): whole-tensor draws
    (the normalization over all of them), each tensor's part of its draw."""

    def draws() -> Iterator[torch.Tensor]:
        for shape in layout.shapes:
            yield torch.randn(shape, generator=generator, dtype=torch.float64)

    if perturbation.kind == "per_coord":
        scale = perturbation.norm
    else:
        # The normalization needs ‖z‖ over all tensors before the first add: draw once to measure, then replay
        # the same stream (generator state restored) instead of holding all of z in memory.
        start = generator.get_state()
        z_norm = math.sqrt(sum(float(z.square().sum()) for z in draws()))
        generator.set_state(start)
        target = perturbation.norm
        if perturbation.kind == "relative":
            target *= math.sqrt(layout.sum(sum(float(t.detach().double().square().sum()) for t in layout.tensors)))
        scale = target / z_norm
    for index, z in enumerate(draws()):
        yield layout.local(index, z).mul(scale)


def _add_ulps(layout: _Layout, steps: int, generator: torch.Generator, tally: _Tally) -> None:
    for index, tensor in enumerate(layout.tensors):
        whole = torch.randint(0, 2, layout.shapes[index], generator=generator, dtype=torch.bool)
        upward = layout.local(index, whole).to(tensor.device)
        moved = add_ulps(tensor.detach(), steps, upward)
        before = tensor.detach().to(torch.float64, copy=True)
        intended = moved.to(torch.float64) - before
        tensor.copy_(moved)
        tally.add(tensor, before, intended)


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def add_ulps(values: torch.Tensor, steps: int, upward: torch.Tensor) -> torch.Tensor:
    """``values`` moved by ``steps`` units in the last place, toward +inf where ``upward`` else toward −inf: bitwise
    ``torch.nextafter`` applied ``steps`` times, in closed form (O(n) whatever ``steps``).

    Finite floats of one sign are ordered like their bit patterns read as integers, so with the key
    k(x) = ±(bit pattern without the sign bit) (the sign of x; k(±0) = 0) one step of ``nextafter`` is k ± 1. The
    result is clamped at ±inf (where ``nextafter`` stays); NaN stays NaN; a result of 0 reached from below is
    −0.0, from above +0.0, as ``nextafter`` gives.
    """
    if values.dtype not in _INT_OF:
        raise TypeError(f"units in the last place need a floating dtype among {list(_INT_OF)}; got {values.dtype}")
    if steps == 0:
        return values.clone()
    integer = _INT_OF[values.dtype]
    width = torch.iinfo(integer).bits
    sign_bit = 1 << (width - 1)
    infinity_key = int(torch.tensor(math.inf, dtype=values.dtype).view(integer))
    raw = values.contiguous().view(integer).to(torch.int64)
    magnitude = raw & (sign_bit - 1)
    key = torch.where(raw < 0, -magnitude, magnitude)
    moved = (key + torch.where(upward, steps, -steps)).clamp(-infinity_key, infinity_key)
    negative = (moved < 0) | ((moved == 0) & upward)  # zero reached from below is -0.0
    result = torch.where(negative, moved.abs() - sign_bit, moved.abs())
    result = result.to(integer).view(values.dtype)
    return torch.where(torch.isnan(values), values, result).reshape(values.shape)


def _add_to_one_coordinate(layout: _Layout, amount: float, generator: torch.Generator, tally: _Tally) -> None:
    index = int(torch.randint(layout.total, (1,), generator=generator))
    for position, (tensor, shape) in enumerate(zip(layout.tensors, layout.shapes)):
        size = math.prod(shape)
        if index >= size:
            index -= size
            continue
        whole = torch.zeros(shape, dtype=torch.float64)  # row-major, any layout
        whole.view(-1)[index] = amount
        eps = layout.local(position, whole).to(tensor.device)
        before = tensor.detach().to(torch.float64, copy=True)
        # Write only the chosen coordinate (row-major position `index`, whatever the layout; under shards, only on
        # the rank holding it): adding 0.0 everywhere else would still turn any -0.0 into +0.0.
        for coordinate in np.argwhere(eps.cpu().numpy() != 0):
            where = tuple(int(i) for i in coordinate)
            tensor[where] = before[where] + amount
        tally.add(tensor, before, eps)
        return


class _Tally:
    """Float64 sums over tensors of ‖ε‖², ‖δ‖², ⟨δ, ε⟩, changed coordinates and ‖δ‖² on former zeros."""

    def __init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.changed = 0
        self.changed_at = dict.fromkeys(_LOW_PRECISION, 0)

    def add(self, tensor: torch.Tensor, before: torch.Tensor, eps: torch.Tensor) -> None:
        after = tensor.detach()
        delta = after.to(torch.float64) - before
        delta_sq = delta.square()
        parts = torch.stack(
            [eps.square().sum(), delta_sq.sum(), (delta * eps).sum(), delta_sq[before == 0].sum()]
        )
        self.sums += parts.cpu()
        self.changed += int((delta != 0).sum())
        for name, dtype in _LOW_PRECISION.items():
            if torch.finfo(after.dtype).bits > torch.finfo(dtype).bits:  # before holds the old values exactly
                self.changed_at[name] += int((after.to(dtype) != before.to(dtype)).sum())

    def report(self, perturbation: Perturbation, total: int,
               all_reduce: Callable[[torch.Tensor], None] | None = None) -> PerturbationReport:
        """The report from the sums (added over the ranks first with ``all_reduce``: shards)."""
        if all_reduce is not None:
            counts = [self.changed, *self.changed_at.values()]
            together = torch.cat([self.sums, torch.tensor(counts, dtype=torch.float64)])
            all_reduce(together)
            self.sums = together[:4]
            self.changed, *at = (int(v) for v in together[4:].tolist())
            self.changed_at = dict(zip(self.changed_at, at))
        nominal_sq, realized_sq, dot, on_zeros = self.sums.tolist()
        nominal, realized = math.sqrt(nominal_sq), math.sqrt(realized_sq)
        survived = realized > 0
        return PerturbationReport(
            kind=perturbation.kind,
            nominal_norm=nominal,
            realized_norm=realized,
            changed=self.changed,
            total=total,
            direction_cosine=dot / (nominal * realized) if survived and nominal > 0 else math.nan,
            share_on_zeros=on_zeros / realized_sq if survived else math.nan,
            perturbation=perturbation,
            changed_at=dict(self.changed_at),
        )
