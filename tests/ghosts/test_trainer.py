"""``dynprobe.ghosts.trainer``: one interface, several implementations (STYLE: "variants of one job are
implementations of one small interface"). Every trainer — sequential copies, the vmap stack, the DDP copies —
has each method of :class:`GhostTrainer` with the protocol's parameters (names, kinds and defaults), so the
ghost set can hold any of them; and the ghost records it keeps behave as documented."""
from __future__ import annotations

import inspect

import pytest

from dynprobe.distributed.ghost_trainer import DistributedGhostTrainer
from dynprobe.ghosts.sequential import SequentialTrainer
from dynprobe.ghosts.trainer import Fault, Ghost, GhostTrainer
from dynprobe.ghosts.vectorized import VectorizedTrainer

PROTOCOL_METHODS = sorted(name for name, member in vars(GhostTrainer).items()
                          if callable(member) and not name.startswith("_"))


def parameters(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("trainer", [SequentialTrainer, VectorizedTrainer, DistributedGhostTrainer],
                         ids=lambda t: t.__name__)
def test_every_trainer_implements_the_protocol_with_its_signatures(trainer):
    assert PROTOCOL_METHODS  # the protocol is read, not restated
    for name in PROTOCOL_METHODS:
        assert callable(getattr(trainer, name, None)), f"{trainer.__name__} lacks {name}"
        assert parameters(getattr(trainer, name)) == parameters(getattr(GhostTrainer, name)), (trainer, name)


def test_a_ghost_is_alive_until_its_status_changes_and_a_fault_says_when():
    ghost = Ghost(3, 10, False, report=None)  # type: ignore[arg-type]
    assert ghost.ghost_id == 3 and ghost.alive and ghost.comparisons == 0 and ghost.replica is None
    for status in ("diverged", "failed", "finished", "interrupted"):
        ghost.status = status
        assert not ghost.alive
    fault = Fault("diverged", "non-finite loss")
    assert fault.when is None  # stops now (a fault found later on the device says when)
