"""Recording a snapshot: the recorder's C (whole and per layer), the background writer, layers of vec(θ)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe._util.evaluation import EvalSet
from dynprobe._util.modules import layer_slices, trainable_parameters
from dynprobe.metrics import functions as metrics
from dynprobe.recording import snapshot as snapshot_module
from dynprobe.recording.background import BackgroundWriteError, BackgroundWriter
from dynprobe.recording.snapshot import SnapshotRecorder, default_history_memory, history_dtype
from dynprobe.recording.train_loss import TrainLoss, read_train_losses
from dynprobe.store.manifest import build_manifest
from dynprobe.store.writer import RunWriter

from ..conftest import MLP, make_data
from ..exact import landed_cosine_dissimilarity


def test_layer_slices_tile_the_parameter_vector_by_owning_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2, bias=False), nn.LayerNorm(2)))
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    layers = layer_slices(model.named_parameters())
    assert [name for name, _ in layers] == ["", "0", "2.0", "2.1"]  # the root module's own parameters come first
    assert [(s.start, s.stop) for _, s in layers] == [(0, 1), (1, 17), (17, 25), (25, 29)]
    # the manifest's (name, numel) form gives the same split
    assert layer_slices([(n, p.numel()) for n, p in model.named_parameters()]) == layers
    # a layer whose parameters are not adjacent becomes one layer per run of them
    odd = layer_slices([("a.w", 2), ("b.w", 3), ("a.b", 1)])
    assert odd == [("a", slice(0, 2)), ("b", slice(2, 5)), ("a#2", slice(5, 6))]


def test_history_dtype_and_default_budget():
    assert history_dtype([torch.zeros(2, dtype=torch.bfloat16)], torch.float32) == torch.bfloat16
    assert history_dtype([torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)], torch.float32) == torch.float32
    assert history_dtype([torch.zeros(2)], torch.float32) == torch.float32
    budget = default_history_memory("cpu")
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    assert 0.1 * available < budget < 0.4 * available


# ------------------------------------------------------------------------------------------------ recorder


def _recorder(tmp_path, model, *, history_memory=None, background=False, name="run"):
    data = make_data((20,), seed=0)
    eval_set = EvalSet.from_user((data.x_test, data.y_test), max_examples=96, seed=0)
    named = trainable_parameters(model)
    manifest = build_manifest(model=model, named_params=named, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              eval_set=eval_set, num_classes=5, storage_dtype=torch.float32,
                              device=torch.device("cpu"), config={}, conventions={})
    sink = RunWriter(tmp_path / name, manifest, resume=False)
    writer = BackgroundWriter(sink) if background else sink
    recorder = SnapshotRecorder(writer, model, [p for _, p in named], eval_set, device=torch.device("cpu"),
                                storage_dtype=torch.float32, output_fn=lambda out: out, eval_batch_size=64,
                                history_memory=history_memory)
    return recorder, writer, data


def _train_and_record(recorder, model, data, snapshots: int, steps_between: int = 3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    torch.manual_seed(1)
    flats = []
    for k in range(snapshots):
        data_ = recorder.measure(k * steps_between)
        flats.append(data_.params.clone())
        recorder.commit(data_, {})
        for _ in range(steps_between):
            i = torch.randint(0, data.x_train.shape[0], (32,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[i]), data.y_train[i]).backward()
            optimizer.step()
    return torch.stack(flats)


@pytest.mark.parametrize("vectors_in_memory", [1000, 4])
def test_recorder_c_and_per_layer_c_against_slicing_the_parameter_vector(tmp_path, vectors_in_memory):
    torch.manual_seed(0)
    model = MLP()
    size = sum(p.numel() for p in model.parameters())
    recorder, writer, data = _recorder(tmp_path, model, history_memory=vectors_in_memory * size * 4)
    flats = _train_and_record(recorder, model, data, 12)
    recorder.materialize()
    run = dynprobe.load_run(writer.root)
    assert run.layers == ["net.0", "net.3", "net.6"]
    assert run.C_layers.shape == (3, 12, 12)
    expected = np.stack([metrics.cosine_dissimilarity_to_many(f, flats).numpy() for f in flats])
    np.testing.assert_allclose(run.C, expected, rtol=1e-9, atol=0)
    offsets = [(s.start, s.stop) for _, s in layer_slices(model.named_parameters())]
    x = flats.numpy()
    for layer, (a, b) in enumerate(offsets):  # numpy, float64, on slices of the stored vectors
        for i in range(12):
            for j in range(12):
                expected = landed_cosine_dissimilarity(x[i, a:b], x[j, a:b])
                assert run.C_layers[layer, i, j] == pytest.approx(expected, rel=1e-9, abs=1e-18)
    if vectors_in_memory == 4:
        assert recorder.bytes_loaded > 0  # the spilled part was read back (and completed at materialize)
    np.testing.assert_array_equal(np.load(writer.root / "metrics" / "C.npy"), run.C)


def test_recorder_through_the_background_writer_writes_the_same_run(tmp_path):
    runs = []
    for background in (False, True):
        torch.manual_seed(0)
        model = MLP()
        recorder, writer, data = _recorder(tmp_path, model, history_memory=5 * 1400 * 4, background=background,
                                           name=f"run{background}")
        _train_and_record(recorder, model, data, 10)
        recorder.materialize()
        writer.close()
        runs.append(dynprobe.load_run(writer.root))
    sync, background = runs
    np.testing.assert_array_equal(background.steps, sync.steps)
    np.testing.assert_array_equal(background.C, sync.C)
    np.testing.assert_array_equal(background.C_layers, sync.C_layers)
    np.testing.assert_array_equal(background.D, sync.D)
    for i in range(len(sync)):
        np.testing.assert_array_equal(background.params(snapshot_index=i), sync.params(snapshot_index=i))
        np.testing.assert_array_equal(background.predictions(snapshot_index=i), sync.predictions(snapshot_index=i))


# ------------------------------------------------------------------------------------------------ background writer


class SlowSink:
    """A sink that records every call (and its thread) and takes its time over arrays."""

    def __init__(self, fail_at_step: int | None = None, delay: float = 0.02) -> None:
        self.root, self.manifest, self.resumed = "nowhere", {"model": {}}, False
        self.snapshots: list[dict] = []
        self.log: list[tuple[str, object, str]] = []
        self.fail_at_step, self.delay = fail_at_step, delay
        self.closed = False

    def _note(self, what, detail):
        self.log.append((what, detail, threading.current_thread().name))

    def event(self, event, /, **fields):
        self._note("event", event)

    def save_array(self, step, name, array):
        time.sleep(self.delay)
        if step == self.fail_at_step:
            raise OSError(28, "No space left on device")
        self._note("array", (step, name))

    def save_arrays(self, step, name, arrays):
        self._note("arrays", (step, name))

    def commit_snapshot(self, record):
        self.snapshots.append({"snapshot_index": len(self.snapshots), **record})
        self._note("commit", record["step"])

    def update_manifest(self, **fields):
        self.manifest.update(fields)
        self._note("manifest", tuple(fields))

    def snapshot_params(self, step):
        self._note("read", step)
        return step

    def close(self):
        self.closed = True


def _snapshot(writer, step):
    writer.save_array(step, "params", np.zeros(3))
    writer.save_arrays(step, "buffers", {})
    writer.event("ghost_compare", step=step)
    writer.commit_snapshot({"step": step})


class GatedSink(SlowSink):
    """A :class:`SlowSink` whose array writes wait until the test opens ``gate``: while it is closed, whatever the
    caller observes was not written yet (no timing involved)."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.gate, self.entered = threading.Event(), threading.Event()

    def save_array(self, step, name, array):
        self.entered.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        super().save_array(step, name, array)

    def committed(self) -> list[int]:
        return [d for w, d, _ in list(self.log) if w == "commit"]


def test_background_writes_keep_the_order_and_leave_the_calling_thread():
    """With the sink blocked, snapshot 0 is handed over and the caller goes on (nothing written yet); snapshot 1's
    commit waits for snapshot 0's (in_flight=1), so when it returns snapshot 0 is on disk. The wall-clock view of
    the same is ``tests/benchmarks/bench_background_writer.py``."""
    sink = GatedSink()
    writer = BackgroundWriter(sink)
    _snapshot(writer, 0)
    assert sink.entered.wait(timeout=60)  # the worker holds snapshot 0's first array
    assert [s["step"] for s in writer.snapshots] == [0] and sink.committed() == []  # the caller did not wait
    committed_when_returned = {}

    def submit(step):
        _snapshot(writer, step)
        committed_when_returned[step] = sink.committed()

    second = threading.Thread(target=submit, args=(1,))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # waits for snapshot 0 while the sink is blocked (it never returns before the gate)
    sink.gate.set()
    second.join(timeout=60)
    assert not second.is_alive() and committed_when_returned[1][:1] == [0]
    for step in (2, 3):
        submit(step)
        assert committed_when_returned[step][: step] == list(range(step))  # at most one commit in flight
    assert [s["step"] for s in writer.snapshots] == [0, 1, 2, 3]  # the caller sees its commits at once
    assert writer.snapshot_params(3) == 3  # a read waits for the writes before it
    assert [entry[:2] for entry in sink.log[:4]] == [("array", (0, "params")), ("arrays", (0, "buffers")),
                                                     ("event", "ghost_compare"), ("commit", 0)]
    assert sink.committed() == [0, 1, 2, 3]
    position = {(w, d): k for k, (w, d, _) in enumerate(sink.log) if w != "event"}
    for step in range(4):  # the files of a snapshot before its commit line, every time
        assert position[("array", (step, "params"))] < position[("commit", step)]
        assert position[("arrays", (step, "buffers"))] < position[("commit", step)]
    assert {thread for w, _, thread in sink.log if w != "read"} == {"dynprobe-writer"}
    writer.update_manifest(status="closed")
    assert sink.log[-1][:2] == ("manifest", ("status",))
    writer.close()
    assert sink.closed


def test_a_failed_background_write_surfaces_at_the_next_call_and_commits_nothing_after_it():
    sink = SlowSink(fail_at_step=1, delay=0.0)
    writer = BackgroundWriter(sink)
    _snapshot(writer, 0)
    with pytest.raises(BackgroundWriteError, match="No space left") as raised:
        for step in range(1, 6):
            _snapshot(writer, step)
            time.sleep(0.01)
    assert isinstance(raised.value.__cause__, OSError)
    assert [s["step"] for s in sink.snapshots] == [0]  # snapshot 1's commit line (and later ones) never written
    assert [s["step"] for s in writer.snapshots] == [0]
    writer.event("probe_error", step=1)  # the probe's fault guard can still record the error, synchronously
    assert sink.log[-1][:2] == ("event", "probe_error") and sink.log[-1][2] == threading.current_thread().name
    writer.close()


def test_close_waits_for_every_queued_write():
    sink = SlowSink(delay=0.05)
    writer = BackgroundWriter(sink, in_flight=10)
    for step in range(5):
        _snapshot(writer, step)
    writer.close()
    assert [s["step"] for s in sink.snapshots] == [0, 1, 2, 3, 4] and sink.closed


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests_parent!r})
    import torch
    from dynprobe.store import writer as writer_module
    from tests.recording.test_snapshot import _recorder, _train_and_record
    from tests.conftest import MLP
    import pathlib

    original = writer_module.atomic_save_npy
    def save(path, array, **kwargs):
        if path.name == "params.npy" and path.parent.name == "step_00000018":  # the 7th snapshot, on the worker
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, array, **kwargs)
    writer_module.atomic_save_npy = save
    torch.manual_seed(0)
    model = MLP()
    recorder, writer, data = _recorder(pathlib.Path(sys.argv[1]), model, history_memory=3 * 1400 * 4,
                                       background=True)
    _train_and_record(recorder, model, data, 10)
    """
)


def test_a_kill_during_a_background_write_leaves_every_earlier_snapshot(tmp_path):
    script = tmp_path / "record.py"
    script.write_text(KILL_SCRIPT.format(tests_parent=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    run = dynprobe.load_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, np.arange(0, 18, 3))
    # C rows of committed snapshots are there (entries still pending in a block are NaN, never garbage)
    c = run.C
    assert np.isfinite(np.diag(c)).all() and np.isfinite(np.diag(c, -1)).all() and np.isfinite(c[:, 0]).all()
    for i in range(len(run)):
        run.params(snapshot_index=i)


def test_the_default_history_budget_is_measured_after_the_first_optimizer_step(tmp_path, monkeypatch):
    """Not at attach: the optimizer state and the step's activations must be taken first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []

    def measured(device):
        seen.append(len(optimizer.state))  # SGD's momentum buffers exist once it has stepped
        return 2**20

    monkeypatch.setattr(snapshot_module, "default_history_memory", measured)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    probe = dynprobe.Probe(model, optimizer, eval_data=(x, y), out=tmp_path / "run", schedule=[0, 2, 4],
                           progress=False)
    assert seen == []
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(4):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    assert seen == [len(list(model.parameters()))]  # once, with the optimizer state of every parameter tensor
    run = dynprobe.load_run(tmp_path / "run")
    assert np.isfinite(run.C).all()


def test_a_float64_training_loss_is_stored_and_averaged_without_passing_through_float32(tmp_path):
    losses = [torch.tensor(1 / 3, dtype=torch.float64), torch.tensor(2.0 + 1e-12, dtype=torch.float64),
              torch.tensor(0.1, dtype=torch.float32)]
    log = TrainLoss(tmp_path / "train_loss.f8")
    for step, loss in enumerate(losses, start=1):
        log.note(step, loss)
    mean, calls = log.pop_mean()
    steps, stored = read_train_losses(tmp_path / "train_loss.f8")
    exact = [float(loss) for loss in losses]  # float32 → float64 is exact
    assert stored.tolist() == exact and steps.tolist() == [1, 2, 3]  # bit for bit; float32 would lose 1e-12
    assert calls == 3 and mean == float(np.mean(np.array(exact)))
