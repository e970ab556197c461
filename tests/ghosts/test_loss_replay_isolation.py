"""LossReplay and LossIsolation (dynprobe.ghosts.loss_replay) on hand-made losses: each replica's copy starts from
the state it should (now, or before any call), shared objects stay shared, a stateful loss is reported once, a
closure whose state copies would share refuses the ghosts before their call, and a ghost that changes the user's
loss state stops them."""
from __future__ import annotations

import torch
from torch import nn

from dynprobe.ghosts.loss_replay import LossIsolation, LossReplay


class CountingLoss(nn.Module):
    def __init__(self, owner: object | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.owner = owner

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return ((output - target) ** 2).mean() * self.calls


def closure_loss():
    calls = [0]

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return ((output - target) ** 2).mean() * calls[0]

    return loss


def test_copies_start_from_the_state_at_the_spawn_or_before_any_call_and_keep_shared_objects():
    owner = object()
    user = CountingLoss(owner)
    replay = LossReplay(shared={id(owner): owner})
    assert replay.copy_now({}) is None and replay.copy_initial({}) is None  # the loss is not known yet
    replay.set_loss(user, {})
    x = torch.ones(2)
    for _ in range(3):
        user(x, x)
    now, initial = replay.copy_now({}), replay.copy_initial({})
    assert (now.calls, initial.calls, user.calls) == (3, 0, 3)
    now(x, x)
    initial(x, x)
    assert (now.calls, initial.calls, user.calls) == (4, 1, 3)  # each copy advances alone
    assert now.owner is owner and initial.owner is owner and now is not user


def test_a_stateful_loss_object_is_reported_once_and_the_ghosts_go_on():
    reports = []
    user = CountingLoss()
    replay = LossReplay()
    replay.set_loss(user, {})
    isolation = LossIsolation(replay, exclude=set(), on_stateful=lambda paths, separate: reports.append((paths,
                                                                                                        separate)))
    isolation.observe()
    x = torch.ones(2)
    for _ in range(3):  # the user's loop calls the loss; the ghosts' step uses their own copies
        user(x, x)
        assert isolation.before_step() is None
        replay.copy_now({})(x, x)
        assert isolation.after_step() is None
    assert reports == [(["calls"], True)]
    assert isolation.stateful == ["calls"] and not isolation.shares_state


def test_a_stateless_loss_is_never_reported():
    replay = LossReplay()
    replay.set_loss(nn.MSELoss(), {})
    reports = []
    isolation = LossIsolation(replay, exclude=set(), on_stateful=lambda *a: reports.append(a))
    isolation.observe()
    for _ in range(3):
        replay.loss_fn(torch.ones(2), torch.zeros(2))
        assert isolation.before_step() is None and isolation.after_step() is None
    assert reports == [] and isolation.refused is None


def test_a_closure_whose_state_copies_share_refuses_the_ghosts_before_their_call():
    reports = []
    user = closure_loss()
    replay = LossReplay()
    replay.set_loss(user, {})
    isolation = LossIsolation(replay, exclude=set(), on_stateful=lambda paths, separate: reports.append(separate))
    isolation.observe()
    assert isolation.before_step() is None  # not seen changing yet
    assert isolation.after_step() is None
    user(torch.ones(2), torch.zeros(2))
    reason = isolation.before_step()
    assert reason is not None and "cannot separate" in reason and reports == [False]


def test_a_ghost_that_changes_the_users_loss_state_stops_the_ghosts():
    user = CountingLoss()
    replay = LossReplay()
    replay.set_loss(user, {})
    isolation = LossIsolation(replay, exclude=set(), on_stateful=lambda *a: None)
    isolation.observe()
    assert isolation.before_step() is None
    user(torch.ones(2), torch.ones(2))  # a ghost calling the user's own loss object
    reason = isolation.after_step()
    assert reason is not None and "a ghost's loss call changed the state of your watched loss (calls)" in reason
    assert isolation.refused == reason
