"""A snapshot is a transaction: an exception (a Ctrl-C included) part-way through it leaves no row behind.

Each test interrupts one snapshot of a probed training loop at one point — the eval forward (a public forward
hook), a row computation, the completion of pending entries, a row file, the commit event, the ``on_snapshot``
callback — catches the ``KeyboardInterrupt`` in the loop as a notebook user would, goes on training, and then checks
every stored C, S and D entry against a float64 recomputation from the stored parameters, kernels and predictions.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe._util.signals import interrupts_deferred
from dynprobe.metrics import interval
from dynprobe.store import rows as rows_module
from dynprobe.store import writer as writer_module

P = 20 * 32 + 32 + 32 * 5 + 5
STEPS = 44
INTERRUPTED = 10  # the snapshot index interrupted (C's history has spilled and its ring turned by then)


def _cosine_dissimilarity(vectors: np.ndarray) -> np.ndarray:
    """``½‖a/‖a‖ − b/‖b‖‖² = 1 − cos(a, b)`` for every pair, in float64 (no cancellation)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.array([[0.5 * np.sum((u - v) ** 2) for v in unit] for u in unit])


class Interrupt:
    """Raises one ``KeyboardInterrupt`` at the ``INTERRUPTED``-th time :meth:`due` is asked while armed."""

    def __init__(self, after: int = INTERRUPTED, error: type[BaseException] = KeyboardInterrupt) -> None:
        self.calls, self.after, self.fired, self.error = 0, after, False, error

    def due(self) -> bool:
        self.calls += 1
        return not self.fired and self.calls > self.after

    def fire(self) -> None:
        self.fired = True
        raise self.error("injected inside a snapshot")


def _train(tmp_path, arm, *, kernel: bool = True, error: type[BaseException] = KeyboardInterrupt,
           errors: str = "warn"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    interrupt = Interrupt(error=error)
    callback = arm(interrupt, model)
    probe = dynprobe.Probe(model, optimizer, eval_data=(torch.randn(64, 20), torch.randint(0, 5, (64,))),
                           out=tmp_path / "run", schedule=1, history_memory=4 * P * 4, on_snapshot=callback,
                           errors=errors,
                           kernel=dynprobe.KernelConfig(n=8, lag_steps=1) if kernel else None)
    criterion = probe.watch(nn.CrossEntropyLoss())
    interrupted = []
    for step in range(STEPS):
        batch = torch.randint(0, 256, (32,))
        optimizer.zero_grad()
        criterion(model(x[batch]), y[batch]).backward()
        try:
            optimizer.step()
        except error:  # the user's Ctrl-C caught in a notebook (or the error errors="raise" gave): training goes on
            interrupted.append(step + 1)
    assert interrupted and interrupt.fired, "the interrupt was never raised"
    assert probe.attached
    probe.close()
    return dynprobe.load_run(tmp_path / "run"), interrupted[0]


def _check_rows(run) -> None:
    params = np.stack([np.asarray(run.params(snapshot_index=i), dtype=np.float64) for i in range(len(run))])
    np.testing.assert_allclose(run.C, _cosine_dissimilarity(params), rtol=1e-8, atol=1e-15)
    preds = np.stack([run.predictions(snapshot_index=i) for i in range(len(run))])
    np.testing.assert_array_equal(run.D, (preds[:, None] != preds[None]).mean(-1))
    for layer, (name, part) in enumerate(_layer_slices(run)):
        np.testing.assert_allclose(run.C_layers[layer], _cosine_dissimilarity(params[:, part]), rtol=1e-8,
                                   atol=1e-15, err_msg=name)
    if run.has_kernels:
        with_kernel = [i for i in range(len(run)) if run.kernel(snapshot_index=i) is not None]
        kernels = np.stack([run.kernel(snapshot_index=i).reshape(-1) for i in with_kernel])
        np.testing.assert_allclose(run.S[np.ix_(with_kernel, with_kernel)], _cosine_dissimilarity(kernels),
                                   rtol=1e-8, atol=1e-15)


def _layer_slices(run) -> list[tuple[str, slice]]:
    sizes = {"0": 20 * 32 + 32, "2": 32 * 5 + 5}
    start, out = 0, []
    for name in run.layers:
        out.append((name, slice(start, start + sizes[name])))
        start += sizes[name]
    return out


def _eval_forward(interrupt, model):
    def hook(module, inputs, output):
        if not module.training and interrupt.due():  # the probe's eval pass (the model is in eval mode)
            interrupt.fire()

    model.register_forward_hook(hook)


def _row(metric_class, name):
    def arm(interrupt, model):
        original = getattr(metric_class, name)

        def patched(self, *args, **kwargs):
            if interrupt.due():
                interrupt.fire()
            return original(self, *args, **kwargs)

        _patches.append((metric_class, name, original))
        setattr(metric_class, name, patched)

    return arm


def _d_row(interrupt, model):  # after C's row (and C's history append, the ring turned)
    _row(interval.FunctionMetric, "summary_and_rows")(interrupt, model)


def _s_row(interrupt, model):  # after C's and D's rows
    original = interval.CosineMetric.summary_and_rows

    def patched(self, vector, stack, summaries):
        if vector.numel() == 64 and interrupt.due():  # the 8 × 8 kernel
            interrupt.fire()
        return original(self, vector, stack, summaries)

    _patches.append((interval.CosineMetric, "summary_and_rows", original))
    interval.CosineMetric.summary_and_rows = patched


def _completion(interrupt, model):  # C's pending entries completed inside its update, after its history append
    interrupt.after = 0
    _row(interval.CosineMetric, "complete")(interrupt, model)


def _row_file(interrupt, model):  # C's files appended, D's not
    original = rows_module.TriangularRows.append

    def patched(self, row, index):
        if self.path.name == "D.rows" and interrupt.due():
            interrupt.fire()
        return original(self, row, index)

    _patches.append((rows_module.TriangularRows, "append", original))
    rows_module.TriangularRows.append = patched


def _commit_event(interrupt, model):  # every row appended, the event line not written
    _row(writer_module.RunWriter, "commit_snapshot")(interrupt, model)


def _ctrl_c_after_the_event_line(interrupt, model):
    """A real SIGINT between the snapshot's event line and the writer registering it: delivered once the commit
    call returns, so the snapshot stands (else the line on disk would name a snapshot whose rows were undone)."""
    original = writer_module.append_jsonl

    def patched(path, record, **kwargs):
        original(path, record, **kwargs)
        if record.get("event") == "snapshot" and interrupt.due():
            interrupt.fired = True
            os.kill(os.getpid(), signal.SIGINT)

    _patches.append((writer_module, "append_jsonl", original))
    writer_module.append_jsonl = patched


def _callback(interrupt, model):  # after the commit: the snapshot stands
    def on_snapshot(record):
        if interrupt.due():
            interrupt.fire()

    return on_snapshot


_patches: list = []


@pytest.fixture(autouse=True)
def _restore():
    yield
    while _patches:
        owner, name, original = _patches.pop()
        setattr(owner, name, original)


@pytest.mark.parametrize("arm, committed", [
    (_eval_forward, False), (_d_row, False), (_s_row, False), (_completion, False), (_row_file, False),
    (_commit_event, False), (_ctrl_c_after_the_event_line, True), (_callback, True),
], ids=["eval-forward", "D-row", "S-row", "C-completion", "row-file", "commit-event", "sigint-after-event-line",
        "on-snapshot"])
def test_an_interrupted_snapshot_leaves_every_stored_row_equal_to_a_recomputation(tmp_path, arm, committed):
    run, step = _train(tmp_path, arm)
    assert run.status == "closed"
    assert (step in run.steps.tolist()) == committed
    assert run.steps[-1] == STEPS and len(run) == STEPS + 1 - (not committed)  # later snapshots were recorded
    _check_rows(run)



def test_any_exception_rolls_the_snapshot_back_and_errors_raise_keeps_recording(tmp_path):
    """Under ``errors="raise"`` a probe failure reaches the user, who may catch it and go on: the failed snapshot
    left nothing behind either."""
    run, step = _train(tmp_path, _d_row, error=RuntimeError, errors="raise")
    assert run.status == "closed" and step not in run.steps.tolist() and run.steps[-1] == STEPS
    _check_rows(run)


def test_a_ctrl_c_inside_a_commit_point_is_raised_when_it_ends_and_the_handler_is_restored():
    handler = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has arrived: without the deferral it is raised here
            finished.append(True)
    assert finished and signal.getsignal(signal.SIGINT) is handler
