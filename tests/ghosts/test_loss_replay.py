"""Ghosts and the user's loss object: each replica computes its loss with its own copy, so a stateful loss (call
counter, curriculum, running statistics) is called only by the user's loop; state a copy cannot separate (a closure)
refuses the ghosts before their first call; per-example losses (``reduction="none"``) are followed. The state walk
itself: ``dynprobe.capture.loss_state``."""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, Perturbation, schedule
from dynprobe.capture.loss_state import copy_loss, loss_state, shared_state, state_changes

from ..conftest import assert_bitwise_equal, mlp_setup, state_of, train


class CurriculumLoss(nn.Module):
    """Cross-entropy weighted by a ramp over its own call count, with an EMA of the loss in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.register_buffer("running", torch.zeros(()))

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.cross_entropy(output, target)
        self.running.mul_(0.9).add_(0.1 * loss.detach())
        return loss * min(1.0, self.calls / 6)


def closure_counter_loss() -> tuple[Callable[..., torch.Tensor], list[int]]:
    calls = [0]

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return nn.functional.cross_entropy(output, target) * min(1.0, calls[0] / 6)

    return loss_fn, calls


def _run(tmp_path, criterion, *, probe: bool, steps: int = 10, ghosts: Ghosts | None = None):
    model, optimizer, scheduler, data = mlp_setup(seed=4)
    torch.manual_seed(7)
    run = None
    if probe:
        ghosts = ghosts or Ghosts(at=[0, 3], perturbation=Perturbation(norm=1e-6))
        attached = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                                  schedule=schedule.every(5), ghosts=ghosts)
        train(model, optimizer, scheduler, data, steps, criterion=attached.watch(criterion))
        attached.close()
        run = dynprobe.load_run(tmp_path / "run")
    else:
        train(model, optimizer, scheduler, data, steps, criterion=criterion)
    return state_of(model), run


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_stateful_loss_module_is_called_only_by_the_users_loop(tmp_path, vectorize):
    """Before: the watched loss was re-called for each ghost (3.7× the calls, the main run changed). Now the main
    run's parameters and the loss's counter and running buffer equal a run without the probe, bit for bit."""
    reference_loss, probed_loss = CurriculumLoss(), CurriculumLoss()
    reference, _ = _run(tmp_path / "a", reference_loss, probe=False)
    ghosts = Ghosts(at=[0, 3], perturbation=Perturbation(norm=1e-6), vectorize=vectorize)
    probed, run = _run(tmp_path / "b", probed_loss, probe=True, ghosts=ghosts)
    assert_bitwise_equal(reference, probed)
    assert probed_loss.calls == reference_loss.calls == 10
    assert torch.equal(probed_loss.running, reference_loss.running)
    [event] = [e for e in run.events if e["event"] == "stateful_loss"]
    assert "calls" in event["changed"] and "_buffers.running" in event["changed"] and event["separate_copies"]
    control = next(g for g in run.ghosts if g.control)
    assert control.status == "finished" and np.all(run.separation(control.ghost_id)[1] == 0)  # its own copy, in step


def test_a_loss_whose_state_lives_in_a_closure_refuses_the_ghosts_before_their_first_call(tmp_path):
    reference_fn, reference_calls = closure_counter_loss()
    probed_fn, probed_calls = closure_counter_loss()
    reference, _ = _run(tmp_path / "a", reference_fn, probe=False)
    with pytest.warns(RuntimeWarning, match=r"closure.*Ghosts\(loss_fn=\.\.\.\)"):
        probed, run = _run(tmp_path / "b", probed_fn, probe=True)
    assert_bitwise_equal(reference, probed)
    assert probed_calls == reference_calls == [10]
    assert run.status == "closed"
    assert [(g.status, g.status_step) for g in run.ghosts] == [("failed", 1), ("failed", 1)]
    assert all("<closure>.calls" in g.reason for g in run.ghosts)
    assert [e["separate_copies"] for e in run.events if e["event"] == "stateful_loss"] == [False]
    assert [e["step"] for e in run.events if e["event"] == "ghost_spawn_skipped"] == [3]  # none spawns after that


def test_a_stateless_loss_is_not_reported_and_its_copies_share_nothing(tmp_path):
    _, run = _run(tmp_path, nn.CrossEntropyLoss(label_smoothing=0.1), probe=True)
    assert not [e for e in run.events if e["event"] == "stateful_loss"]
    assert all(g.status == "finished" for g in run.ghosts)


def test_per_example_losses_are_followed_and_logged_as_their_mean(tmp_path):
    """Before: a watched CrossEntropyLoss(reduction="none") detached the probe at its first snapshot."""
    model, optimizer, _, data = mlp_setup(seed=2)
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           schedule=schedule.every(3), ghosts=Ghosts(at=[0]), errors="raise")
    criterion = probe.watch(nn.CrossEntropyLoss(reduction="none"))
    means = []
    for _ in range(6):
        index = torch.randint(0, data.x_train.shape[0], (16,))
        losses = criterion(model(data.x_train[index]), data.y_train[index])
        means.append(losses.detach().double().mean().item())
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and all(g.status == "finished" for g in run.ghosts)
    control = next(g for g in run.ghosts if g.control)
    assert np.all(run.separation(control.ghost_id)[1] == 0)
    np.testing.assert_allclose(run.train_loss[1:], [np.mean(means[:3]), np.mean(means[3:])], rtol=1e-12)
    [event] = [e for e in run.events if e["event"] == "per_example_loss"]
    assert event["shape"] == [16] and event["step"] == 1


def test_the_state_walk_sees_counters_buffers_closures_and_partials():
    module = CurriculumLoss()
    before = loss_state(module, set())
    module(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, dtype=torch.long))
    assert state_changes(before, loss_state(module, set())) == ["_buffers.running", "calls"]
    function, calls = closure_counter_loss()
    wrapped = functools.partial(function)
    before = loss_state(wrapped, set())
    function(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert state_changes(before, loss_state(wrapped, set())) == ["<func>.<closure>.calls.0"]
    assert shared_state(function, copy_loss(function, {}), set())  # a function's copy is the function
    assert not shared_state(module, copy_loss(module, {}), set())
    excluded = CurriculumLoss()
    excluded.model = nn.Linear(2, 2)
    assert not any(path.startswith("model") for path in loss_state(excluded, {id(excluded.model)}).tokens)


def test_a_loss_that_cannot_be_copied_is_refused_at_watch_naming_the_fix(tmp_path):
    class Uncopyable(nn.CrossEntropyLoss):
        def __deepcopy__(self, memo):
            raise TypeError("holds a file handle")

    model, optimizer, _, data = mlp_setup()
    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                           ghosts=Ghosts(at=[0]))
    with pytest.raises(ValueError, match=r"deepcopy\(Uncopyable\) failed.*Ghosts\(loss_fn=\.\.\.\)"):
        probe.watch(Uncopyable())
    probe.close()
