"""A ``torch.compile``d training loop under the probe: the probe computes (eNTK, evaluations, ghosts) on the original
module, never through the user's compiled wrapper, so the compiled run compiles exactly as often as without the
probe and stays bitwise equal to it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe
from dynprobe import Ghosts, KernelConfig, schedule

from ..conftest import assert_bitwise_equal, cnn_setup, state_of, train


def _compiled_run(tmp_path, backend, *, probe: bool, steps: int = 8):
    torch._dynamo.reset()
    model, optimizer, scheduler, data = cnn_setup(seed=1)
    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(5)
    criterion = nn.CrossEntropyLoss()
    attached = None
    if probe:
        attached = dynprobe.Probe(compiled, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "run",
                                  schedule=schedule.every(1), kernel=KernelConfig(n=8),
                                  ghosts=Ghosts(at=[0, 3]), errors="raise")
        assert attached.model is model  # the module the probe computes on: the original, not the wrapper
        criterion = attached.watch(criterion)
    train(compiled, optimizer, scheduler, data, steps, criterion=criterion)
    if attached is not None:
        attached.close()
    return state_of(model)


def test_the_probe_never_recompiles_the_users_compiled_model(tmp_path):
    """Before: the eNTK and evaluations went through the compiled wrapper — 26 extra compilations in 12 steps of this
    loop, each a recompilation of the user's model (graph breaks at the kernel's taps). Now as many as without it."""
    graphs: list[int] = []

    def counting(graph_module: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        graphs.append(len(graph_module.graph.nodes))
        return graph_module.forward

    reference = _compiled_run(tmp_path / "a", counting, probe=False)
    without = list(graphs)
    graphs.clear()
    with pytest.warns(RuntimeWarning, match=r"compiled \(torch.compile\)"):  # ghosts replay it eagerly: said
        probed = _compiled_run(tmp_path / "b", counting, probe=True)
    assert graphs == without
    assert_bitwise_equal(reference, probed)
    run = dynprobe.load_run(tmp_path / "b" / "run")
    assert run.status == "closed" and list(run.steps) == list(range(9))
    assert [g.status for g in run.ghosts] == ["finished"] * 3  # the hooks on the wrapper captured every step
    control = next(g for g in run.ghosts if g.control)
    assert np.all(run.separation(control.ghost_id)[1] == 0)  # eager replay of an eager-equivalent compiled step


def test_a_module_compiled_in_place_keeps_its_training_graph_and_its_run(tmp_path):
    """``model.compile()`` has no original module to compute on: the probe's work runs under the force_eager stance.
    Before: 27 extra compilations in 12 steps. Now the training graphs are those without the probe; the one extra
    graph is empty — the probe's capture hook, traced with the compiled ``_call_impl``, breaks the graph before the
    forward."""
    graphs: list[int] = []

    def counting(graph_module: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        graphs.append(len(graph_module.graph.nodes))
        return graph_module.forward

    states, compiled = [], {}
    for probe in (False, True):
        torch._dynamo.reset()
        graphs.clear()
        model, optimizer, scheduler, data = cnn_setup(seed=1)
        model.compile(backend=counting)
        torch.manual_seed(5)
        criterion = nn.CrossEntropyLoss()
        if probe:
            with pytest.warns(RuntimeWarning, match=r"compiled \(torch.compile\)"):
                attached = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test),
                                          out=tmp_path / "run", schedule=schedule.every(1),
                                          kernel=KernelConfig(n=8), ghosts=Ghosts(at=[0, 3]), errors="raise")
            criterion = attached.watch(criterion)
        train(model, optimizer, scheduler, data, 8, criterion=criterion)
        if probe:
            attached.close()
        compiled[probe] = list(graphs)
        states.append(state_of(model))
    assert_bitwise_equal(*states)
    assert [n for n in compiled[True] if n > 1] == compiled[False] and compiled[True].count(1) == 1  # 1: empty


@pytest.mark.slow  # inductor compiles C++ on the CPU: about a minute
def test_a_compiled_run_with_kernels_and_ghosts_is_bitwise_equal_to_the_same_run_without_the_probe(tmp_path):
    reference = _compiled_run(tmp_path / "a", "inductor", probe=False)
    with pytest.warns(RuntimeWarning, match=r"compiled \(torch.compile\)"):
        probed = _compiled_run(tmp_path / "b", "inductor", probe=True)
    assert_bitwise_equal(reference, probed)
