"""What a training step consumed and its replay (dynprobe/capture/): RNG and autocast states, micro-batches and
gradient accumulation, the paths by which a loss reaches the model output, hooks that must stay silent, and the
gradient-edit detector. Each replay is checked bitwise against the main model's own gradients."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dynprobe.capture.hooks import CaptureHooks, GradEditDetector
from dynprobe.capture.step import AutocastState, RngState, StepCapture, replay_micro_batch
from dynprobe.capture.watched import WatchedLoss

from ..conftest import MLP


class Harness:
    """The capture parts wired as the probe wires them, on a model and an untouched deep copy of it (the replica)."""

    def __init__(self, model: nn.Module, loss_fn=None, *, busy: bool = False) -> None:
        self.model = model
        self.replica = copy.deepcopy(model)  # before the hooks: a replica carries none
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.capture = StepCapture([])
        self.busy = busy
        self.hooks = CaptureHooks(model, self.capture, lambda: self.busy)
        self.criterion = WatchedLoss(self.loss_fn, on_loss=self.capture.on_loss, muted=lambda: self.busy)

    def replay(self, micro_batches, loss_fn=None) -> dict[str, torch.Tensor]:
        """Replay on the replica (restoring the RNG afterwards, as the ghosts do); its gradients by name."""
        rng = torch.get_rng_state()
        self.replica.zero_grad(set_to_none=True)
        for micro in micro_batches:
            replay_micro_batch(self.replica, micro, loss_fn=loss_fn or self.loss_fn, loss_from_output=None)
        torch.set_rng_state(rng)
        return {n: p.grad.clone() for n, p in self.replica.named_parameters() if p.grad is not None}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |Δ| {(a[name] - b[name]).abs().max()}"


def _batch(seed: int = 0, n: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=generator), torch.randint(0, 5, (n,), generator=generator)


# ---------------------------------------------------------------------------------------------- RNG and autocast


def test_replay_reuses_the_dropout_masks_of_the_main_forward():
    torch.manual_seed(0)
    harness = Harness(MLP(dropout=0.5))
    x, y = _batch()
    harness.criterion(harness.model(x), y).backward()
    (micro,) = harness.capture.take().micro_batches
    after = torch.get_rng_state()
    _assert_same(harness.replay([micro]), _grads(harness.model))
    assert torch.equal(torch.get_rng_state(), after)
    # without the recorded RNG state the masks differ, and so do the gradients
    harness.replica.zero_grad(set_to_none=True)
    loss = harness.loss_fn(harness.replica(x), y)
    loss.backward()
    assert not all(torch.equal(a, b) for a, b in zip(_grads(harness.replica).values(), _grads(harness.model).values()))


def test_rng_state_restores_the_cpu_stream():
    state = RngState.capture()
    first = torch.rand(4)
    state.restore()
    assert torch.equal(torch.rand(4), first)


def test_autocast_state_is_captured_and_re_entered():
    assert AutocastState.capture().regions == ()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = AutocastState.capture()
    assert inside.regions == (("cpu", torch.bfloat16),)
    with inside.entered():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), AutocastState().entered():
        assert not torch.is_autocast_enabled("cpu")  # a step recorded without autocast replays without it


def test_a_bf16_autocast_step_replays_bitwise():
    torch.manual_seed(1)
    harness = Harness(MLP())
    x, y = _batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = harness.criterion(harness.model(x), y)
    loss.backward()
    micro_batches = harness.capture.take().micro_batches
    assert micro_batches[0].forward.autocast.regions == (("cpu", torch.bfloat16),)
    _assert_same(harness.replay(micro_batches), _grads(harness.model))


# ---------------------------------------------------------------------------------------------- micro-batches


def test_gradient_accumulation_replays_the_recorded_loss_scaling():
    """Three micro-batches, each loss divided by 3 outside the watched loss: dL_total/dloss = 1/3 is recorded."""
    torch.manual_seed(2)
    harness = Harness(MLP())
    for k in range(3):
        x, y = _batch(10 + k)
        (harness.criterion(harness.model(x), y) / 3).backward()
    micro_batches = harness.capture.take().micro_batches
    assert len(micro_batches) == 3
    assert all(torch.equal(m.grad, torch.tensor(1 / 3)) for m in micro_batches)
    _assert_same(harness.replay(micro_batches), _grads(harness.model))
    assert harness.capture.take().micro_batches == []  # take() starts the next step


def test_only_training_forwards_with_a_backward_are_captured():
    torch.manual_seed(3)
    harness = Harness(MLP())
    x, y = _batch(3)
    harness.model.eval()
    harness.criterion(harness.model(x), y).backward()  # eval mode: not a training forward
    harness.model.train()
    with torch.no_grad():
        harness.model(x)  # no grad: an evaluation
    harness.criterion(harness.model(x), y)  # no backward: no recorded dL/dloss, not replayed
    harness.busy = True
    harness.criterion(harness.model(x), y).backward()  # the probe's own calls
    harness.busy = False
    assert harness.capture.take().micro_batches == []


def test_a_backpropagated_loss_on_a_tensor_from_no_captured_forward_is_counted_unmatched():
    harness = Harness(MLP())
    x, y = _batch()
    harness.model(x)
    harness.criterion(torch.randn(16, 5, requires_grad=True), y)  # no backward: not counted
    harness.criterion(torch.randn(16, 5, requires_grad=True), y).backward()
    captured = harness.capture.take()
    assert captured.micro_batches == [] and len(captured.unmatched) == 1
    assert not captured.unmatched[0].from_output


def test_an_input_edited_in_place_after_the_forward_is_detected():
    harness = Harness(MLP())
    x, y = _batch()
    harness.criterion(harness.model(x), y).backward()
    assert harness.capture.forwards[0].inputs_unchanged()
    x.add_(1.0)
    assert not harness.capture.forwards[0].inputs_unchanged()


# ---------------------------------------------------------------------------------------------- loss call paths


@dataclass
class Output:
    logits: torch.Tensor
    aux: torch.Tensor


class Wrapped(nn.Module):
    """An MLP whose output is a dict, a tuple or a dataclass."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = MLP(), kind

    def forward(self, x):
        logits = self.net(x)
        aux = logits.square().mean()
        return {"dict": {"logits": logits, "aux": aux}, "tuple": (logits, aux),
                "dataclass": Output(logits, aux)}[self.kind]


LOSS_PATHS = {
    "dict-item": ("dict", lambda criterion, out, y: criterion(out["logits"], y)),
    "tuple-item": ("tuple", lambda criterion, out, y: criterion(out[0], y)),
    "keyword-arguments": ("tuple", lambda criterion, out, y: criterion(input=out[0], target=y)),
    "whole-output": ("dataclass", lambda criterion, out, y: criterion(out, y)),
    "two-pieces": ("dict", lambda criterion, out, y: criterion((out["logits"], out["aux"]), y)),
}


def _loss_for(path: str):
    if path == "whole-output":
        return lambda out, target: nn.functional.cross_entropy(out.logits, target) + out.aux
    if path == "two-pieces":
        return lambda pair, target: nn.functional.cross_entropy(pair[0], target) + 0.1 * pair[1]
    return lambda input, target: nn.functional.cross_entropy(input, target)


@pytest.mark.parametrize("path", list(LOSS_PATHS))
def test_the_loss_finds_the_replicas_output_wherever_the_main_output_was_passed(path):
    kind, call = LOSS_PATHS[path]
    torch.manual_seed(4)
    harness = Harness(Wrapped(kind), _loss_for(path))
    x, y = _batch(4)
    call(harness.criterion, harness.model(x), y).backward()
    (micro,) = harness.capture.take().micro_batches
    assert micro.loss is not None and micro.loss.substitutions
    _assert_same(harness.replay([micro]), _grads(harness.model))


def test_output_loss_path_replays_the_loss_the_model_returns():
    class SelfLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def forward(self, x, labels):
            logits = self.net(x)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

    torch.manual_seed(5)
    model = SelfLoss()
    replica = copy.deepcopy(model)
    capture = StepCapture([])
    CaptureHooks(model, capture, lambda: False, loss_from_output=lambda out: out["loss"])
    x, y = _batch(5)
    model(x, labels=y)["loss"].backward()
    (micro,) = capture.take().micro_batches
    assert micro.loss is None
    replay_micro_batch(replica, micro, loss_fn=None, loss_from_output=lambda out: out["loss"])
    _assert_same(_grads(replica), _grads(model))


# ---------------------------------------------------------------------------------------------- hooks


def test_watched_loss_is_transparent():
    weight = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0])
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    seen = []
    criterion = WatchedLoss(loss_fn, on_loss=lambda loss, args, kwargs: seen.append(loss), muted=lambda: False)
    logits, y = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    loss = criterion(logits, y)
    assert torch.equal(loss, loss_fn(logits, y)) and seen == [loss]
    assert criterion.weight is weight
    with torch.no_grad():
        criterion(logits, y)
    assert len(seen) == 1  # evaluations are not training losses


def test_gradient_edits_between_backward_and_step_are_detected():
    torch.manual_seed(6)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    edits = []
    detector = GradEditDetector([p for p in model.parameters()], optimizer, lambda: edits.append(1))
    x, y = _batch(6)
    for clip in (False, True, False):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        optimizer.step()
    assert edits == [1]  # only the clipped step
    detector.remove()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    optimizer.step()
    assert edits == [1]


def test_hooks_ignore_other_modules_and_can_be_removed():
    torch.manual_seed(7)
    harness = Harness(MLP())
    x, y = _batch(7)
    harness.loss_fn(harness.replica(x), y).backward()  # another module (e.g. a ghost): not the main model
    assert harness.capture.forwards == []
    harness.hooks.remove()
    harness.criterion(harness.model(x), y).backward()
    assert harness.capture.forwards == [] and harness.capture.take().micro_batches == []
