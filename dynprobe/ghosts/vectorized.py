"""The vectorized mode of :class:`dynprobe.ghosts.GhostSet`, and the choice of mode (``Ghosts(vectorize=...)``).

In vectorized mode the ghosts are rows of one :class:`dynprobe.ghost_stack.GhostStack` that also holds an ε = 0
**shadow** of the main run, spawned from the main model and optimizer at the first spawn step. Vmapped kernels
differ from the plain ones in the last bits (BatchNorm/LayerNorm reductions, some small matmuls), so the shadow
drifts from the main run; every ghost is therefore spawned from the *shadow's* state at its t0 (plus ε) and
compared with the shadow, never with the main model (the manifest's ``ghost_mode`` and ``conventions.ghosts``
say which reference a run used). The ε = 0 control ghost is a second ε = 0 row and must stay bitwise equal to
the shadow; how far the shadow drifted from the main run is recorded at every snapshot (``shadow_drift``
events, informational). A stack lives as long as one of its ghosts: when the last one stops, it is freed, and
a later spawn starts a new stack with a new shadow from the main run.

Choosing the mode: ``vectorize=False`` is sequential from the start; ``True`` checks at construction that the
model runs under vmap (else a clear ``ValueError``; a GradScaler is refused too) and falls back to sequential,
with a warning, if the first stacked step fails anyway; ``"auto"`` decides at the first training step after the
first spawn, for the ghosts alive then. Rules decide first — sequential for a GradScaler (each replica
needs its own skip decisions), undeclared gradient edits already detected (only the sequential control, compared
with the main run itself, shows their effect), a single ghost (a stack trains it next to the shadow), and an
optimizer that is not elementwise (a stack would step each row on its own) — otherwise full training steps of
both paths on the captured batch are timed on throwaway copies of the ghosts, and the stack is chosen only when
it takes less than ``AUTO_MARGIN`` of the sequential time; a trial that fails (not vmappable) means
sequential. A stack amortizes better with more rows, so a sequential choice made by measurement (or for a single
ghost) is revisited once twice as many ghosts are live (at the spawn step that gets there, the clones are exact
relative to the main run, so a stack of them and a fresh shadow copied from the main run is exact as well). A
vectorized choice is final: its ghosts are compared with the shadow from then on. Every choice and its reason are recorded (``ghost_mode`` events with their step; the manifest's
``ghost_mode`` and ``conventions["ghosts"]`` hold the latest). Ghosts spawn as sequential clones of the main run until the mode is known; the
stack then absorbs them (they are exact at that point, and the shadow is the main run at their spawn step).

Faults: a row whose loss is non-finite is marked ``diverged`` and leaves the stack; the other rows train on
(rows never mix: vmapped kernels, per-row clipping, elementwise or per-row optimizers). An exception in a
stacked step after the first one, or in evaluating the shadow, marks every ghost of the stack ``failed``; none
reaches the user's loop (unless the probe runs with ``errors="raise"``).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from dynprobe._util.evaluation import evaluate, index_inputs, inputs_to
from dynprobe.capture.step import MicroBatch
from dynprobe.metrics import functions as metrics
from dynprobe.recording.snapshot import SnapshotData, flatten_parameters
from dynprobe.store.manifest import GHOST_MODE_CONVENTIONS
from dynprobe.store.writer import RunWriter

from ._stack_optimizers import is_elementwise
from .perturbation import Perturbation, PerturbationReport, perturb_
from .stack import GhostStack, ReplicaState, check_vmappable

if TYPE_CHECKING:
    from .ghost_set import Ghost, GhostSet

__all__ = ["SHADOW", "VectorizedGhosts", "record_ghost_mode"]

SHADOW = "shadow"  # the stack key of the ε = 0 shadow of the main run
TIMING_REPEATS = 5
# "auto" vectorizes only when the stack's dry run takes less than this fraction of the sequential one: the
# timings are noisy, and when in doubt the sequential path (exact reference, no shadow) is the better choice.
AUTO_MARGIN = 0.9


def record_ghost_mode(writer: RunWriter, mode: str, *, step: int, **fields: Any) -> None:
    """Write the ghosts' mode and reference into the run: a ``ghost_mode`` event, and the manifest's
    ``ghost_mode`` field and ``conventions["ghosts"]`` text."""
    reference = "main" if mode == "sequential" else "shadow"
    writer.event("ghost_mode", step=step, mode=mode, reference=reference, **fields)
    conventions = {**writer.manifest.get("conventions", {}), "ghosts": GHOST_MODE_CONVENTIONS[mode]}
    writer.update_manifest(ghost_mode={"mode": mode, "reference": reference, "step": step}, conventions=conventions)


class VectorizedGhosts:
    """The vectorized half of a :class:`GhostSet` (``owner``): mode choice, stack, shadow, comparisons."""

    def __init__(self, owner: GhostSet) -> None:
        self.owner = owner
        self.requested = owner.config.vectorize
        self.mode: str | None = None  # None until decided; then "vectorized" or "sequential"
        self.stack: GhostStack | None = None
        self._pending_shadow: ReplicaState | None = None  # the main run at the spawn step, until a stack exists
        self._confirmed = False  # a stacked step has succeeded: no fallback to sequential after that
        # "auto" chose sequential for this many live ghosts or fewer (by measurement, or because there was one):
        # it measures again once that many have spawned (None: the choice is final).
        self.revisit_at: int | None = None
        self._control_drifted = False
        if self.requested is True:
            self._check_vectorizable()

    @property
    def has_stack(self) -> bool:
        return self.stack is not None

    def _check_vectorizable(self) -> None:
        owner = self.owner
        if owner.config.scaler is not None:
            raise ValueError("Ghosts(vectorize=True) cannot be combined with scaler=: every replica needs its own "
                             "GradScaler skip decisions, which one stacked step cannot make. Use vectorize=False "
                             "or 'auto' (which then trains the ghosts sequentially)")
        sample = inputs_to(index_inputs(owner.eval_set.inputs, slice(0, min(8, owner.eval_set.n))), owner.device)
        args, kwargs = ((), dict(sample)) if isinstance(sample, Mapping) else ((sample,), {})
        try:
            check_vmappable(owner.model, args, kwargs, owner.output_fn, no_copy=list(owner._memo.values()))
        except ValueError as error:
            raise ValueError(f"Ghosts(vectorize=True): {error}") from None

    # ------------------------------------------------------------------------------------------ spawning

    def note_clone_spawn(self) -> None:
        """A ghost was spawned (and added) as a sequential clone of the main run: keep an ε = 0 copy of the main
        run at the same step, the shadow of the stack that may absorb the clones. In sequential mode, only when
        enough ghosts are live for "auto" to measure again (at the next training step): the clones are exact
        replicas relative to the main run, so a stack built now from them and a copy of the main run is exact too.
        """
        if self.mode == "sequential":
            if self.revisit_at is None or len(self.owner.live) < self.revisit_at:
                return
            self.mode, self.revisit_at = None, None
        if self.stack is None and self._pending_shadow is None:
            owner = self.owner
            self._pending_shadow = ReplicaState.copy_of(owner.model, owner.optimizer, owner._memo)

    def spawn_in_stack(self, index: int, perturbation: Perturbation) -> PerturbationReport:
        """A new row: the shadow's parameters, buffers and optimizer state now, plus ε."""
        assert self.stack is not None
        replica = self.stack.export(SHADOW)
        report = perturb_(replica.params, perturbation)
        self.stack.add(index, replica)
        return report

    def release(self, ghost: Ghost) -> None:
        """``ghost`` stopped: drop its row; with no live ghost left, free the stack (and its shadow)."""
        if self.stack is not None and ghost.index in self.stack:
            self.stack.remove(ghost.index)
        if not self.owner.live:
            self.stack, self._pending_shadow = None, None

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> bool:
        """Advance the stacked ghosts; False when the step belongs to the sequential path (mode sequential,
        or just fallen back to it, with the clones untouched)."""
        owner = self.owner
        if self.mode == "sequential":
            return False
        pending = [g for g in owner.live if g.model is not None]  # clones waiting for a stack
        if self.mode is None:
            self._decide(micro_batches, step, pending)
            if self.mode == "sequential":
                return False
        try:
            if self.stack is None:
                self._build(pending)
            assert self.stack is not None
            finite = self.stack.train_step(micro_batches, owner.optimizer, loss_fn=owner.loss_fn,
                                           loss_from_output=owner.loss_from_output)
        except Exception as error:  # noqa: BLE001 - a ghost fault never reaches the user's loop
            if not self._confirmed:
                reason = f"the first stacked step failed ({type(error).__name__}: {error})"
                self._set_mode("sequential", step, reason, warn=self.requested is True)
                return False
            self._fail_all(step, f"{type(error).__name__}: {error}", traceback.format_exc())
            if owner.raise_errors:
                raise
            return True
        self._confirmed = True
        self._pending_shadow = None
        for ghost in pending:  # now rows of the stack: free the clones
            ghost.model, ghost.optimizer, ghost.params = None, None, []  # type: ignore[assignment]
        self._update_statuses(finite, step)
        if self.stack is not None:
            self._check_control(step)
        return True

    def _build(self, pending: list[Ghost]) -> None:
        self.stack = self._new_stack(pending)

    def _new_stack(self, pending: list[Ghost]) -> GhostStack:
        """A stack of the pending shadow and the clones ``pending`` (it copies them: they stay untouched)."""
        owner = self.owner
        if self._pending_shadow is None:
            raise RuntimeError("internal: ghosts spawned without a shadow of the main run")
        stack = GhostStack(owner.model, owner.optimizer, clip_grad_norm=owner.config.clip_grad_norm,
                           clip_grad_value=owner.config.clip_grad_value, no_copy=list(owner._memo.values()))
        stack.extend([SHADOW] + [g.index for g in pending],
                     [self._pending_shadow] + [ReplicaState.of(g.model, g.optimizer) for g in pending])
        return stack

    def _update_statuses(self, finite: dict[Any, bool], step: int) -> None:
        owner = self.owner
        if not finite.get(SHADOW, True):
            self._fail_all(step, "the ε=0 shadow of the main run (the reference of vectorized ghosts) had a "
                                 "non-finite loss")
            return
        lifetime = owner.config.lifetime
        for ghost in [g for g in owner.live if self.stack is not None and g.index in self.stack]:
            if not finite[ghost.index]:
                owner._set_status(ghost, "diverged", step, "non-finite loss")
            elif lifetime is not None and step - ghost.spawn_step >= lifetime:
                owner._set_status(ghost, "finished", step, f"lifetime of {lifetime} steps reached")

    def _fail_all(self, step: int, reason: str, trace: str | None = None) -> None:
        """Every live ghost stops as ``failed``: in vectorized mode they all belong to the stack (rows, or clones
        that were about to become rows)."""
        extra = {"traceback": trace} if trace else {}
        for ghost in self.owner.live:
            self.owner._set_status(ghost, "failed", step, reason, **extra)
        self.stack, self._pending_shadow = None, None

    def _check_control(self, step: int) -> None:
        owner, stack = self.owner, self.stack
        control = next((g for g in owner.live if g.control and g.index in stack), None)
        if control is None or self._control_drifted:
            return
        drifted = stack.differences(control.index, SHADOW)
        if not drifted:
            return
        self._control_drifted = True
        owner.writer.event("control_drift", step=step, ghost=control.index, reference="shadow",
                           tensors=list(drifted)[:10], max_abs_diff=max(drifted.values()),
                           likely_causes=["nondeterministic kernels (run with torch.use_deterministic_algorithms)"])
        owner._warn_once("control-drift",
                         f"dynprobe: the ε=0 control ghost drifted from the ε=0 shadow of its vectorized stack at "
                         f"step {step} (max |Δ| {max(drifted.values()):.3g}): rows of one stack should be computed "
                         "identically. Use Ghosts(vectorize=False) for a bit-exact reference")

    # ------------------------------------------------------------------------------------------ choosing

    def _decide(self, micro_batches: list[MicroBatch], step: int, pending: list[Ghost]) -> None:
        owner = self.owner
        if self.requested is True:
            self._set_mode("vectorized", step, "requested: Ghosts(vectorize=True)", ghosts=len(pending))
            return
        rule = None
        if owner.config.scaler is not None:
            rule = "a GradScaler is declared: every replica needs its own skip decisions"
        elif owner.grad_edit_detected:
            rule = ("undeclared gradient edits were detected: only the sequential control ghost, compared with the "
                    "main run itself, can show their effect")
        elif len(pending) < 2:
            rule = ("a single ghost: a stack would train it together with the shadow (two replicas instead of "
                    "one); measured again when more ghosts are live")
        elif not is_elementwise(owner.optimizer):
            rule = (f"{type(owner.optimizer).__name__} is not an elementwise optimizer: a stack would need one "
                    "optimizer step per replica")
        if rule is not None:
            self._set_mode("sequential", step, rule, ghosts=len(pending))
            if len(pending) < 2:
                self.revisit_at = 2
            return
        try:
            sequential_s, vectorized_s = self._time_trial_steps(micro_batches, pending)
        except Exception as error:  # noqa: BLE001 - e.g. not vmappable: the sequential path needs no vmap
            self._set_mode("sequential", step, f"the stacked trial step failed, the model or loss cannot be "
                                               f"vmapped ({type(error).__name__}: {error})", ghosts=len(pending))
            return
        mode = "vectorized" if vectorized_s < AUTO_MARGIN * sequential_s else "sequential"
        reason = (f"measured: a training step of {len(pending)} ghosts took {sequential_s * 1e3:.3g} ms sequentially "
                  f"and {vectorized_s * 1e3:.3g} ms as a stack of {len(pending) + 1} replicas (with the shadow); "
                  f"vectorized only below {AUTO_MARGIN:g}× the sequential time")
        if mode == "sequential":
            reason += f"; measured again when {2 * len(pending)} ghosts are live"
        self._set_mode(mode, step, reason, ghosts=len(pending), sequential_seconds=sequential_s,
                       vectorized_seconds=vectorized_s)
        if mode == "sequential":  # a stack amortizes better with more rows: measure again at twice as many
            self.revisit_at = 2 * len(pending)

    def _time_trial_steps(self, micro_batches: list[MicroBatch], pending: list[Ghost]) -> tuple[float, float]:
        """Median seconds of one full training step (replay, clipping, optimizer step) of all ghosts on the
        captured micro-batches: sequentially and as a stack. Both run on throwaway copies — deep copies of the
        clones, and a stack built from copies of them and the shadow — so the ghosts themselves are untouched."""
        from .ghost_set import Ghost, clone_for_ghost  # ghosts imports this module

        owner = self.owner
        trial_stack = self._new_stack(pending)
        trials = []
        for ghost in pending:
            model, optimizer = clone_for_ghost(ghost.model, ghost.optimizer, owner._memo)
            params = [p for p in model.parameters() if p.requires_grad]
            trials.append(Ghost(-1, ghost.spawn_step, ghost.control, model, optimizer, None, params, ghost.report))
        device = owner.device

        def sequential() -> None:
            for trial in trials:
                owner._train_ghost(trial, [micro_batches])

        def vectorized() -> None:
            trial_stack.train_step(micro_batches, owner.optimizer, loss_fn=owner.loss_fn,
                                   loss_from_output=owner.loss_from_output)

        def timed(run: Callable[[], None]) -> float:
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started

        sequential(), vectorized()  # warm-up (allocations, first-call dispatch, optimizer state)
        times: dict[str, list[float]] = {"sequential": [], "vectorized": []}
        for _ in range(TIMING_REPEATS):  # interleaved: machine speed drifts
            times["sequential"].append(timed(sequential))
            times["vectorized"].append(timed(vectorized))
        return statistics.median(times["sequential"]), statistics.median(times["vectorized"])

    def _set_mode(self, mode: str, step: int, reason: str, *, warn: bool = False, **fields: Any) -> None:
        self.mode = mode
        if mode == "sequential":
            self.stack, self._pending_shadow = None, None
        optimizer = None  # how the stack steps its rows (GhostStack's optimizer_mode="auto" rule)
        if mode == "vectorized":
            optimizer = "stacked" if is_elementwise(self.owner.optimizer) else "per_replica"
        record_ghost_mode(self.owner.writer, mode, step=step, requested=self.requested, reason=reason,
                          optimizer=optimizer, **fields)
        if warn:
            self.owner._warn_once("ghost-mode", f"dynprobe: ghosts fall back to the sequential path: {reason}")

    # ------------------------------------------------------------------------------------------ snapshots

    def compare(self, data: SnapshotData, kernel_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None,
                main_state: Mapping[str, torch.Tensor]) -> None:
        """Compare every stacked ghost with the shadow (C, L2, D, B, S through ``GhostSet._compare_one``) and
        record the shadow's drift from the main snapshot ``data``."""
        owner, stack = self.owner, self.stack
        assert stack is not None
        ghosts = [g for g in owner.live if g.index in stack]
        try:
            shadow = stack.materialize(SHADOW)
            shadow_flat = flatten_parameters([p for p in shadow.parameters() if p.requires_grad],
                                             owner.storage_dtype)
            shadow_eval = evaluate(shadow, owner.eval_set, output_fn=owner.output_fn,
                                   batch_size=owner.eval_batch_size, device=owner.device)
            shadow_state = {name: t.detach().clone() for name, t in
                            list(shadow.named_parameters()) + list(shadow.named_buffers()) if t is not None}
            kernel = None
            costly = data.step == owner.final_step or any(g.comparisons % owner.config.costly_every == 0
                                                              for g in ghosts)
            if kernel_of is not None and data.kernel is not None and costly:
                kernel = kernel_of(shadow_state)
            self._record_shadow_drift(data, shadow_flat, shadow_eval.preds, shadow_state, main_state)
        except Exception as error:  # noqa: BLE001 - without its reference no ghost of the stack can be compared
            self._fail_all(data.step, f"the shadow could not be evaluated ({type(error).__name__}: {error})",
                           traceback.format_exc())
            if owner.raise_errors:
                raise
            return
        reference = dataclasses.replace(data, params=shadow_flat, evaluation=shadow_eval, kernel=kernel)
        for ghost in ghosts:
            if not ghost.alive or self.stack is None or ghost.index not in self.stack:
                continue
            module = self.stack.materialize(ghost.index)
            ghost.model, ghost.params = module, [p for p in module.parameters() if p.requires_grad]
            try:
                owner._compare_one(ghost, reference, shadow_flat, kernel_of, shadow_state)
            except Exception as error:  # noqa: BLE001
                owner._set_status(ghost, "failed", data.step, f"{type(error).__name__}: {error}",
                                  traceback=traceback.format_exc())
                if owner.raise_errors:
                    raise
            finally:
                if ghost.alive:  # the module is the stack's scratch template, not the ghost's own
                    ghost.model, ghost.params = None, []  # type: ignore[assignment]

    def _record_shadow_drift(self, data: SnapshotData, shadow_flat: torch.Tensor, shadow_preds: torch.Tensor,
                             shadow_state: Mapping[str, torch.Tensor], main_state: Mapping[str, torch.Tensor]) -> None:
        differing = {name: float((main_state[name].double() - value.double()).abs().max())
                     for name, value in shadow_state.items()
                     if name in main_state and not torch.equal(main_state[name], value)}
        self.owner.writer.event(
            "shadow_drift", step=data.step, bitwise_equal=not differing,
            max_abs_diff=max(differing.values(), default=0.0), tensors_differing=len(differing),
            C=metrics.cosine_dissimilarity(data.params, shadow_flat), L2=metrics.l2_distance(data.params, shadow_flat),
            D=metrics.disagreement(data.evaluation.preds, shadow_preds),
        )
