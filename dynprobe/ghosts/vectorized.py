"""The vectorized ghost trainer (``Ghosts(vectorize=True | "auto")``), and the choice between stack and copies.

In vectorized mode the ghosts are rows of one :class:`dynprobe.ghosts.stack.GhostStack` that also holds an ε = 0
**shadow** of the main run, copied from the main model and optimizer when the stack is built. Vmapped kernels
differ from the plain ones in the last bits (BatchNorm/LayerNorm reductions, some small matmuls), so the shadow
drifts from the main run; every ghost is therefore spawned from the *shadow's* state at its t0 (plus ε) and compared
with the shadow, never with the main model. The ε = 0 control ghost is a second ε = 0 row and must stay bitwise
equal to the shadow; how far the shadow drifted from the main run is recorded next to the ghost signal at every
snapshot. A stack lives as long as one of its ghosts: when the last one stops it is freed, and a later spawn
starts a new stack with a new shadow from the main run.

Choosing the mode: ``True`` checks at construction that the model runs under vmap (else a clear ``ValueError``; a
GradScaler is refused too) and falls back to sequential, with a warning, if the first stacked step fails anyway;
``"auto"`` decides at the first training step after the first spawn, for the ghosts alive then. Rules decide first
— sequential for a GradScaler (each replica needs its own skip decisions), undeclared gradient edits already
detected (only the sequential control, compared with the main run itself, shows their effect), a single ghost (a
stack trains it next to the shadow), and an optimizer that is not elementwise — otherwise full training steps of
both paths on the captured batch are timed on throwaway copies, and the stack is chosen only when it takes less
than :data:`AUTO_MARGIN` of the sequential time; a trial that fails (not vmappable) means sequential. A sequential
choice made by measurement (or for a single ghost) is revisited once twice as many ghosts are live (at that spawn
step the copies are exact relative to the main run, so a stack of them and a fresh shadow is exact as well). A
vectorized choice is final. Until the mode is known, ghosts spawn as deep copies of the main run (the sequential
trainer inside this one holds them); the stack then absorbs them.

Faults: a row whose loss is non-finite is ``diverged`` and leaves the stack; the other rows train on (rows never
mix). The finiteness flags stay on the device and are read in batches by the ghost set
(:mod:`dynprobe.ghosts.readings`): a diverged row may train a few more steps before it leaves, and is recorded as
diverged at the step its loss first went non-finite. An exception in a stacked step after the first one, or in
evaluating the shadow, stops every ghost of the stack as ``failed`` (so does a non-finite loss of the shadow).
"""
from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dynprobe._util.modules import max_abs_differences
from dynprobe.capture.loss_state import copy_loss, module_memo
from dynprobe.capture.step import MicroBatch
from dynprobe.metrics import functions as metrics

from ._stack_optimizers import is_elementwise
from .comparison import compare_ghost
from .perturbation import Perturbation, PerturbationReport, perturb_
from .replica import Replica, differing, named_tensors, train_replica
from .sequential import SequentialTrainer
from .stack import GhostStack, ReplicaState, check_vmappable, flatten
from .trainer import Fault, Ghost, MainSnapshot, Reference, TrainerContext

__all__ = ["AUTO_MARGIN", "SHADOW", "VectorizedTrainer"]

SHADOW = "shadow"  # the stack key of the ε = 0 shadow of the main run
TIMING_REPEATS = 5
# "auto" vectorizes only when the stack's dry run takes less than this fraction of the sequential one: the
# timings are noisy, and when in doubt the sequential path (exact reference, no shadow) is the better choice.
AUTO_MARGIN = 0.9


class VectorizedTrainer:
    """Ghosts as rows of a vmap stack with an ε = 0 shadow (see the module docstring); deep copies while the mode
    is undecided or sequential, through the :class:`SequentialTrainer` it holds."""

    comparer = staticmethod(compare_ghost)

    def __init__(self, context: TrainerContext) -> None:
        self.context = context
        self.requested = context.config.vectorize
        self.mode: str | None = None  # None until decided; then "vectorized" or "sequential"
        self.stack: GhostStack | None = None
        self.sequential = SequentialTrainer(context, reason=None)
        self._live: dict[int, Ghost] = {}  # the ghosts this trainer holds (rows or copies), by ghost id
        self._pending_shadow: ReplicaState | None = None  # the main run at the spawn step, until a stack exists
        self._shadow_loss: Any = None  # the stack's copy of the watched loss, taken with the shadow
        self._confirmed = False  # a stacked step has succeeded: no fallback to sequential after that
        # "auto" chose sequential for this many live ghosts or fewer: it measures again once that many have spawned.
        self.revisit_at: int | None = None
        if self.requested is True:
            self._check_vectorizable()

    def _check_vectorizable(self) -> None:
        context = self.context
        if context.config.scaler is not None:
            raise ValueError("Ghosts(vectorize=True) cannot be combined with scaler=: every replica needs its own "
                             "GradScaler skip decisions, which one stacked step cannot make. Use vectorize=False")
        sample = context.sample_inputs()
        args, kwargs = ((), dict(sample)) if isinstance(sample, Mapping) else ((sample,), {})
        try:
            check_vmappable(context.model, args, kwargs, context.output_fn, no_copy=list(context.no_copy.values()))
        except ValueError as error:
            raise ValueError(f"Ghosts(vectorize=True): {error}") from None

    # ------------------------------------------------------------------------------------------ spawning

    def spawn(self, ghost: Ghost, perturbation: Perturbation) -> PerturbationReport:
        self._live[ghost.ghost_id] = ghost
        if self.stack is not None:  # a new row: the shadow's parameters, buffers and optimizer state now, plus ε
            replica = self.stack.export(SHADOW)
            report = perturb_(replica.params, perturbation)
            self.stack.add(ghost.ghost_id, replica)
            return report
        report = self.sequential.spawn(ghost, perturbation)
        self._note_copy_spawn()
        return report

    def _note_copy_spawn(self) -> None:
        """A ghost was spawned as a deep copy of the main run: keep an ε = 0 copy of the main run at the same step,
        the shadow of the stack that may absorb the copies. In sequential mode only when enough ghosts are live for
        "auto" to measure again (at the next training step)."""
        if self.mode == "sequential":
            if self.revisit_at is None or len(self._live) < self.revisit_at:
                return
            self.mode, self.revisit_at = None, None
        if self.stack is None and self._pending_shadow is None:
            context = self.context
            self._pending_shadow = ReplicaState.copy_of(context.model, context.optimizer, context.no_copy)
            self._shadow_loss = context.replay.copy_now(module_memo(context.model, context.model))

    def release(self, ghost: Ghost) -> None:
        self._live.pop(ghost.ghost_id, None)
        ghost.replica = None
        if self.stack is not None and ghost.ghost_id in self.stack:
            self.stack.remove(ghost.ghost_id)
        if not self._live:  # the last ghost stopped: free the stack and its shadow
            self.stack, self._pending_shadow, self._shadow_loss = None, None, None

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, ghosts: list[Ghost], micro_batches: list[MicroBatch], step: int
                   ) -> list[tuple[int, Fault]]:
        if self.mode == "sequential":
            return self.sequential.train_step(ghosts, micro_batches, step)
        pending = [g for g in ghosts if g.replica is not None]  # copies waiting for a stack
        if self.mode is None:
            self._decide(micro_batches, step, pending)
            if self.mode == "sequential":
                return self.sequential.train_step(ghosts, micro_batches, step)
        context = self.context
        try:
            if self.stack is None:
                self.stack = self._new_stack(pending)
            finite = self.stack.train_step(micro_batches, context.optimizer, loss_fn=self._stack_loss(),
                                           loss_from_output=context.replay.loss_from_output)
        except Exception as error:  # noqa: BLE001 - a ghost fault never reaches the user's loop
            if not self._confirmed:  # the copies are untouched (the stack copied them): train them instead
                reason = f"the first stacked step failed ({type(error).__name__}: {error})"
                self._set_mode("sequential", step, reason, warn=self.requested is True)
                return self.sequential.train_step(ghosts, micro_batches, step)
            return self._fail_all(f"{type(error).__name__}: {error}", traceback.format_exc(), error)
        self._confirmed = True
        self._pending_shadow = None
        for ghost in pending:  # now rows of the stack: free the copies
            ghost.replica = None
        # Device flags, read later by the ghost set: a non-finite shadow fails every row, before the rows' own flags.
        nonfinite = ~finite
        rows = [g for g in ghosts if g.ghost_id in self.stack]
        shadow = Fault("failed", "the ε=0 shadow of the main run (the reference of vectorized ghosts) had a "
                       "non-finite loss", when=nonfinite[self.stack.row(SHADOW)])
        return [(g.ghost_id, shadow) for g in rows] + [
            (g.ghost_id, Fault("diverged", "non-finite loss", when=nonfinite[self.stack.row(g.ghost_id)]))
            for g in rows]

    def _new_stack(self, pending: list[Ghost]) -> GhostStack:
        """A stack of the pending shadow and the copies ``pending`` (it copies them: they stay untouched)."""
        context = self.context
        if self._pending_shadow is None:
            raise RuntimeError("internal: ghosts spawned without a shadow of the main run")
        stack = GhostStack(context.model, context.optimizer, clip_grad_norm=context.config.clip_grad_norm,
                           clip_grad_value=context.config.clip_grad_value, no_copy=list(context.no_copy.values()))
        stack.extend([SHADOW] + [g.ghost_id for g in pending],
                     [self._pending_shadow] + [ReplicaState.of(g.replica.model, g.replica.optimizer)
                                               for g in pending])
        return stack

    def _stack_loss(self) -> Any:
        """The stack's copy of the watched loss (one call per micro-batch for all rows, as in the main run; the model
        it may reference stays the main model's); a shadow taken before the loss was known copies it as it was before
        any call."""
        if self._shadow_loss is None:
            self._shadow_loss = self.context.replay.copy_initial(module_memo(self.context.model, self.context.model))
        return self._shadow_loss

    def _fail_all(self, reason: str, trace: str | None = None, error: BaseException | None = None
                  ) -> list[tuple[int, Fault]]:
        """Every ghost this trainer holds stops as ``failed`` (rows, or copies about to become rows)."""
        self.stack, self._pending_shadow, self._shadow_loss = None, None, None
        return [(ghost_id, Fault("failed", reason, trace, error)) for ghost_id in self._live]

    # ------------------------------------------------------------------------------------------ choosing

    def _decide(self, micro_batches: list[MicroBatch], step: int, pending: list[Ghost]) -> None:
        context = self.context
        if self.requested is True:
            self._set_mode("vectorized", step, "requested: Ghosts(vectorize=True)", ghosts=len(pending))
            return
        rule = None
        if context.config.scaler is not None:
            rule = "a GradScaler is declared: every replica needs its own skip decisions"
        elif context.grad_edit_detected:
            rule = ("undeclared gradient edits were detected: only the sequential control ghost, compared with the "
                    "main run itself, can show their effect")
        elif len(pending) < 2:
            rule = ("a single ghost: a stack would train it together with the shadow (two replicas instead of "
                    "one); measured again when more ghosts are live")
        elif not is_elementwise(context.optimizer):
            rule = (f"{type(context.optimizer).__name__} is not an elementwise optimizer: a stack would need one "
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
        """Median seconds of one full training step (replay, clipping, optimizer step) of all ghosts on the captured
        micro-batches: sequentially and as a stack. Both run on throwaway copies — deep copies of the ghosts' copies,
        and a stack built from copies of them and the shadow — so the ghosts themselves are untouched."""
        context, config = self.context, self.context.config
        trial_stack = self._new_stack(pending)
        trials = [Replica.clone(g.replica.model, g.replica.optimizer, context.no_copy) for g in pending]
        trial_loss = copy_loss(self._stack_loss(), context.no_copy) if self._stack_loss() is not None else None

        def sequential() -> None:
            for trial in trials:
                train_replica(trial, [micro_batches], context.optimizer, context.main_params, context.replay,
                              clip_grad_norm=config.clip_grad_norm, clip_grad_value=config.clip_grad_value)

        def vectorized() -> None:
            trial_stack.train_step(micro_batches, context.optimizer, loss_fn=trial_loss,
                                   loss_from_output=context.replay.loss_from_output)

        def timed(run: Callable[[], None]) -> float:
            started = time.perf_counter()
            run()
            if context.device.type == "cuda":
                torch.cuda.synchronize(context.device)
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
            self.stack, self._pending_shadow, self._shadow_loss = None, None, None
        optimizer = None  # how the stack steps its rows (GhostStack's optimizer_mode="auto" rule)
        if mode == "vectorized":
            optimizer = "stacked" if is_elementwise(self.context.optimizer) else "per_replica"
        self.context.on_mode(mode, step, reason, warn=warn, requested=self.requested, optimizer=optimizer, **fields)

    # ------------------------------------------------------------------------------------------ reading

    def separations(self, ghosts: list[Ghost]) -> dict[int, torch.Tensor]:
        result = self.sequential.separations([g for g in ghosts if g.replica is not None])
        if self.stack is not None:
            result.update(self.stack.separations(SHADOW, [g.ghost_id for g in ghosts if g.ghost_id in self.stack]))
        return result

    def control_drift(self, control: Ghost) -> tuple[str, list[str], torch.Tensor] | None:
        if self.stack is not None and control.ghost_id in self.stack:
            return "shadow", *self.stack.row_differences(control.ghost_id, SHADOW)
        return self.sequential.control_drift(control)

    def reference(self, main: MainSnapshot, *, kernel_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None
                  ) -> Reference:
        """The shadow (when a stack exists), with its drift from the main snapshot ``main``; else the main run."""
        if self.stack is None:
            return self.sequential.reference(main, kernel_of=kernel_of)
        context = self.context
        shadow = self.stack.materialize(SHADOW)
        flat = flatten([p for p in shadow.parameters() if p.requires_grad], context.storage_dtype)
        evaluation = context.evaluate(shadow)
        state = {name: t.clone() for name, t in named_tensors(shadow).items()}
        kernel = kernel_of(state) if kernel_of is not None else None
        names = [name for name in state if name in main.state]
        differences = max_abs_differences([main.state[n] for n in names], [state[n] for n in names])
        differ = differing(names, differences.tolist())
        drift = {"bitwise_equal": not differ, "max_abs_diff": max(differ.values(), default=0.0),
                 "tensors_differing": len(differ), "C": metrics.cosine_dissimilarity(main.params, flat),
                 "L2": metrics.l2_distance(main.params, flat), "D": context.disagreement(main.preds, evaluation.preds)}
        return Reference("shadow", flat, evaluation.preds, kernel, state, drift, evaluation)

    def module_of(self, ghost: Ghost) -> tuple[nn.Module, list[torch.Tensor]]:
        if ghost.replica is not None:
            return self.sequential.module_of(ghost)
        assert self.stack is not None
        module = self.stack.materialize(ghost.ghost_id)  # the stack's scratch template, valid until the next call
        return module, [p for p in module.parameters() if p.requires_grad]

    def state_of(self, ghost: Ghost) -> dict[str, torch.Tensor]:
        if ghost.replica is not None:
            return self.sequential.state_of(ghost)
        assert self.stack is not None
        return self.stack.row_state(ghost.ghost_id)

    def reference_state(self) -> dict[str, torch.Tensor]:
        if self.stack is None:
            return self.sequential.reference_state()
        return self.stack.row_state(SHADOW)
