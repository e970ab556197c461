"""The snapshot step (dynprobe.probe.sequence.SnapshotSequence) with recording stand-ins: the parts run in the
documented order, a committed snapshot reaches the online detector even when an interrupt follows its commit (and
an uncommitted one never does), and a sink that writes nothing (DDP ranks > 0) calls no callback or barrier."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dynprobe.probe.sequence import SnapshotSequence


class Log(list):
    def part(self, name: str):
        def record(*args, **kwargs):
            self.append((name, args, kwargs))
        return record

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self]


class Recorder:
    def __init__(self, log: Log, sink, fail: BaseException | None = None, fail_after_commit: bool = True) -> None:
        self.log, self.sink, self.fail, self.fail_after_commit = log, sink, fail, fail_after_commit
        self.last_rows, self.last_filled = {"C": [0.5]}, {"C": 1}

    def measure(self, step: int):
        self.log.append(("measure", (step,), {}))
        return SimpleNamespace(step=step, extra_arrays={})

    def commit(self, data, record):
        if self.fail is not None and not self.fail_after_commit:
            raise self.fail
        self.sink.snapshots.append({"step": data.step})
        self.log.append(("commit", (data.step, record), {}))
        if self.fail is not None:
            raise self.fail
        return {"step": data.step}


def build(log: Log, *, writes: bool = True, fail=None, fail_after_commit=True, ghosts_inert=()):
    sink = SimpleNamespace(snapshots=[{"step": 0}], writes=writes, root="/run", flush=log.part("flush"))
    progress = SimpleNamespace(snapshot=lambda step: contextlib.nullcontext(), phase=log.part("phase"))
    model = nn.Linear(2, 1)
    sequence = SnapshotSequence(
        recorder=Recorder(log, sink, fail, fail_after_commit), kernel=None,
        train_loss=SimpleNamespace(pop_mean=lambda: (0.25, 4)),
        learning_rates=SimpleNamespace(flush=log.part("learning_rates")),
        barriers=SimpleNamespace(on_snapshot=log.part("barriers")),
        transition=SimpleNamespace(update=log.part("transition"), estimate=None),
        progress=progress, model=model, sink=sink, on_snapshot=log.part("on_snapshot"),
        inert=SimpleNamespace(check=lambda step: list(ghosts_inert)))
    return sequence, model


def ghosts_for(log: Log):
    return SimpleNamespace(live=[1, 2], compare=log.part("compare"), set_inert=log.part("set_inert"))


def test_the_parts_run_in_the_documented_order_and_the_callback_sees_the_committed_snapshot():
    log = Log()
    sequence, model = build(log, ghosts_inert=["bias"])
    sequence.take(10, ghosts=ghosts_for(log))
    assert [n for n in log.names if n != "phase"] == ["measure", "set_inert", "compare", "learning_rates",
                                                       "commit", "transition", "flush", "on_snapshot", "barriers"]
    commit = next(args for name, args, _ in log if name == "commit")
    assert commit == (10, {"train_loss": 0.25, "train_loss_calls": 4})
    transition = next(args for name, args, _ in log if name == "transition")
    assert transition == (10, {"C": [0.5]}, {"C": 1})
    payload = next(args[0] for name, args, _ in log if name == "on_snapshot")
    assert payload["steps"] == [0, 10] and payload["out"] == "/run" and payload["rows"] == {"C": [0.5]}
    main_state = next(args[2] for name, args, _ in log if name == "compare")
    assert set(main_state) == {"weight", "bias"} and torch.equal(main_state["weight"], model.weight)
    assert not main_state["weight"].requires_grad  # detached: the ghosts' comparison cannot reach the graph


def test_an_interrupt_after_the_commit_still_reaches_the_detector_and_nothing_after():
    log = Log()
    sequence, _ = build(log, fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        sequence.take(10, ghosts=None)
    assert log.names[-2:] == ["commit", "transition"]
    assert "on_snapshot" not in log.names and "barriers" not in log.names


def test_a_commit_that_fails_before_writing_a_snapshot_tells_the_detector_nothing():
    log = Log()
    sequence, _ = build(log, fail=RuntimeError("disk full"), fail_after_commit=False)
    with pytest.raises(RuntimeError, match="disk full"):
        sequence.take(10, ghosts=None)
    assert "transition" not in log.names


def test_a_sink_that_writes_nothing_calls_no_detector_callback_or_barrier():
    log = Log()
    sequence, _ = build(log, writes=False)
    sequence.take(10, ghosts=ghosts_for(log))
    assert "commit" in log.names and "compare" in log.names
    assert not {"transition", "on_snapshot", "barriers", "flush"} & set(log.names)
