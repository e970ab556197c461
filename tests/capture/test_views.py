"""Loss arguments that are views of the model's output (dynprobe/capture/views.py): the geometry recovered from
metadata and replayed on another output, the views refused with their reason, arguments computed from the output;
then end to end — the nanoGPT ``criterion(logits.reshape(-1, V), y.reshape(-1))`` and a shifted slice keep the
ghosts alive with the control exactly 0, the main run bitwise equal to a probe-free run and no host sync on a plain
step, while a loss on ``logits * 2`` stops the ghosts with a message that says so."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.capture.hooks import CaptureHooks
from dynprobe.capture.step import StepCapture, replay_micro_batch
from dynprobe.capture.views import OutputView, derived_from, locate_view
from dynprobe.capture.watched import WatchedLoss
from dynprobe.ghosts.readings import READ_EVERY

from ..conftest import assert_bitwise_equal, state_of
from ..host_syncs import HostSyncCounter

VOCAB, LENGTH = 11, 8


class TinyLM(nn.Module):
    """Token logits (N, T, V), with dropout so that a replay must reuse the main run's masks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.hidden(self.embed(tokens)))))


def _tokens(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    return x, torch.roll(x, -1, dims=1)


def nanogpt_loss(criterion, logits, y):
    return criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def shifted_loss(criterion, logits, y):
    return criterion(logits[:, :-1, :].transpose(1, 2), y[:, 1:])  # (N, V, T-1) against (N, T-1): views only


def scaled_loss(criterion, logits, y):
    return criterion((logits * 2).reshape(-1, VOCAB), y.reshape(-1))  # computed from the output: not a view


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("make", [
    lambda t: t.reshape(-1, t.shape[-1]), lambda t: t.flatten(), lambda t: t.transpose(0, 2),
    lambda t: t[:, :-1, :], lambda t: t[..., 1:, 2:5], lambda t: t[1], lambda t: t.unsqueeze(0).permute(3, 1, 0, 2),
], ids=["reshape", "flatten", "transpose", "shift", "slices", "select", "unsqueeze-permute"])
def test_a_view_replays_on_another_output_as_the_same_elements(make):
    output, other = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    view = locate_view(make(output), output)
    assert isinstance(view, OutputView) and not view.detached
    assert torch.equal(view.of(other), make(other))
    assert view.of(other).stride() == make(output).stride()


def test_a_view_of_an_output_at_a_storage_offset_replays_relative_to_it():
    buffer = torch.randn(2, 3, 4)
    output, other = buffer[1], torch.randn(3, 4)  # the output is dense, at offset 12 of its storage
    view = locate_view(output[:, 1:], output)
    assert isinstance(view, OutputView) and view.offset == 1
    assert torch.equal(view.of(other), other[:, 1:])
    assert locate_view(buffer[0], output) is None  # memory beside the output is not the output


def test_a_detached_view_replays_detached():
    output = torch.randn(4, 5, requires_grad=True) * 1
    view = locate_view(output.detach().reshape(-1), output)
    assert isinstance(view, OutputView) and view.detached
    assert not view.of(torch.randn(4, 5, requires_grad=True) * 1).requires_grad


def test_views_that_cannot_be_replayed_are_refused_with_their_reason():
    output = torch.randn(4, 1)
    assert "overlap" in locate_view(output.expand(4, 6), output)
    mean, _ = torch.randn(4, 6).chunk(2, dim=1)  # a slice of a larger tensor
    assert "not dense" in locate_view(mean[:, :2], mean)
    assert isinstance(locate_view(mean.detach(), mean), OutputView)  # the output itself is always fine
    assert locate_view(torch.randn(4, 1), output) is None


def test_an_output_of_another_layout_is_a_clear_error():
    output = torch.randn(4, 6)
    view = locate_view(output.reshape(-1), output)
    with pytest.raises(ValueError, match="stride .* where the main output had"):
        view.of(torch.randn(6, 4).t())


def test_an_argument_computed_from_the_output_names_the_operation():
    weight = torch.randn(3, requires_grad=True)
    output = weight * torch.randn(4, 3)
    assert derived_from((output.double() + 1).sum(), [output.grad_fn]) == "ToCopyBackward0"
    assert derived_from(weight * 2, [output.grad_fn]) is None
    assert derived_from(output.detach() * 2, [output.grad_fn]) is None


# ---------------------------------------------------------------------------------------------- capture and replay


@pytest.mark.parametrize("loss", [nanogpt_loss, shifted_loss], ids=["reshape", "shifted-slice"])
def test_a_loss_on_a_view_of_the_output_replays_bitwise(loss):
    torch.manual_seed(0)
    model = TinyLM()
    replica = TinyLM()
    replica.load_state_dict(model.state_dict())
    capture = StepCapture([])
    CaptureHooks(model, capture, lambda: False)
    criterion = WatchedLoss(nn.CrossEntropyLoss(), on_loss=capture.on_loss, muted=lambda: False)
    x, y = _tokens(0)
    loss(criterion, model(x), y).backward()
    captured = capture.take()
    assert len(captured.micro_batches) == 1 and captured.unmatched == []
    (substitution,) = captured.micro_batches[0].loss.substitutions
    assert substitution.view is not None
    rng = torch.get_rng_state()
    replay_micro_batch(replica, captured.micro_batches[0], loss_fn=nn.CrossEntropyLoss(), loss_from_output=None)
    torch.set_rng_state(rng)
    for (name, p), q in zip(model.named_parameters(), replica.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_a_loss_computed_from_the_output_is_unmatched_with_its_reason():
    model = TinyLM()
    capture = StepCapture([])
    CaptureHooks(model, capture, lambda: False)
    criterion = WatchedLoss(nn.CrossEntropyLoss(), on_loss=capture.on_loss, muted=lambda: False)
    x, y = _tokens(0)
    scaled_loss(criterion, model(x), y).backward()
    captured = capture.take()
    (unmatched,) = captured.unmatched
    assert captured.micro_batches == [] and unmatched.from_output
    assert "argument 0 is computed from the model's output (MulBackward0)" in unmatched.reason
    assert "Probe(loss_from_output=...)" in unmatched.reason and "Ghosts(loss_fn=...)" in unmatched.reason


# ---------------------------------------------------------------------------------------------- end to end


def _train(loss, steps: int, probe_out=None, *, vectorize=False, device=torch.device("cpu")):
    """A token LM trained with ``loss`` on ``device``; with ``probe_out``, probed with the control and one perturbed
    ghost."""
    torch.manual_seed(0)
    model = TinyLM().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    criterion, probe = nn.CrossEntropyLoss(), None
    if probe_out is not None:
        probe = dynprobe.Probe(model, optimizer, eval_data=_tokens(99, 32), out=probe_out, errors="raise",
                               schedule=schedule.at([0, steps]), progress=False,
                               ghosts=Ghosts(at=[0], perturbation=Perturbation(norm=1e-4), vectorize=vectorize))
        criterion = probe.watch(criterion)
    torch.manual_seed(1)
    for step in range(steps):
        x, y = (t.to(device) for t in _tokens(step))
        value = loss(criterion, model(x), y)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    rng = torch.get_rng_state()
    if probe is not None:
        probe.close()
    return state_of(model), rng


@pytest.mark.parametrize("loss", [nanogpt_loss, shifted_loss], ids=["reshape", "shifted-slice"])
def test_ghosts_live_on_a_loss_of_a_view_with_the_control_exact_and_the_main_run_untouched(loss, device, tmp_path):
    reference, reference_rng = _train(loss, 12, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: the probe replays this loop as it is
        probed, probed_rng = _train(loss, 12, tmp_path / "run", device=device)
    assert_bitwise_equal(probed, reference)
    assert torch.equal(probed_rng, reference_rng)
    run = dynprobe.load_run(tmp_path / "run")
    assert [(g.status, g.reason) for g in run.ghosts] == [("finished", "run closed")] * 2  # alive until the end
    control = next(g for g in run.ghosts if g.control)
    _, l2 = run.separation(control.ghost_id)
    assert len(l2) == 13 and np.all(l2 == 0.0)
    perturbed = next(g for g in run.ghosts if not g.control)
    assert run.separation(perturbed.ghost_id)[1][-1] > 0


def test_vectorized_ghosts_replay_a_loss_of_a_view(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dynprobe. at step")  # the shadow's drift: not tested here
        _train(nanogpt_loss, 6, tmp_path / "run", vectorize=True)
    run = dynprobe.load_run(tmp_path / "run")
    assert [(g.status, g.reason) for g in run.ghosts] == [("finished", "run closed")] * 2  # alive until the end


def test_a_loss_computed_from_the_output_stops_the_ghosts_saying_so(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"computed from the model's output \(MulBackward0\)") as caught:
        _train(scaled_loss, 3, tmp_path / "run")
    messages = " ".join(str(w.message) for w in caught)
    assert "Probe(loss_from_output=...)" in messages and "wrap the loss" not in messages.lower()
    run = dynprobe.load_run(tmp_path / "run")
    assert {g.status for g in run.ghosts} == {"failed"}
    assert all("computed from the model's output" in g.reason for g in run.ghosts)


def test_a_plain_step_on_a_loss_of_a_view_makes_no_host_sync(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # AdamW reads its step count on a CPU
    probe = dynprobe.Probe(model, optimizer, eval_data=_tokens(99, 32), out=tmp_path / "run", progress=False,
                           schedule=schedule.at([0, 4]), ghosts=Ghosts(at=[1, 2, 3]))
    criterion = probe.watch(nn.CrossEntropyLoss())
    reads = []
    for step in range(1, 4 + 2 * READ_EVERY + 1):
        x, y = _tokens(step)
        with HostSyncCounter(cuda=False) as counter:
            value = nanogpt_loss(criterion, model(x), y)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        if step > 4 and counter.total:
            reads.append((step, counter.total))
    probe.close()
    assert reads == [(4 + READ_EVERY, 1), (4 + 2 * READ_EVERY, 1)]
