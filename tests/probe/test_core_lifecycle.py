"""The probe's life cycle (dynprobe.probe.core.Probe): its signature lists every option with the default a plain
ProbeOptions() holds, its clock counts optimizer steps, a ``with`` block records how it ended, and the exit handler
closes every probe left open (and only those)."""
from __future__ import annotations

import inspect

import pytest

from dynprobe import schedule
from dynprobe.probe import core
from dynprobe.probe.core import Probe
from dynprobe.probe.options import ProbeOptions
from dynprobe.store.layout import MANIFEST
from dynprobe.store.run import load_run

from ..conftest import mlp_setup, train


def test_the_signature_lists_every_option_with_the_default_that_omitting_it_gives():
    parameters = list(inspect.signature(Probe).parameters.values())
    assert [p.name for p in parameters[:4]] == ["model", "optimizer", "eval_data", "out"]
    defaults = ProbeOptions()
    options = parameters[4:]
    assert {p.name for p in options} == set(vars(defaults))
    for p in options:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert repr(ProbeOptions(**{p.name: p.default})) == repr(defaults), p.name  # the same as omitting it
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['shedule'\]"):
        Probe(*mlp_setup()[:2], eval_data=None, out="unused", shedule=1)


def test_the_clock_counts_optimizer_steps_and_a_with_block_records_how_it_ended(tmp_path):
    model, optimizer, scheduler, data = mlp_setup()
    with Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "ok", eval_max=32,
               schedule=schedule.at([0, 3]), progress=False) as probe:
        assert probe.global_step == 0 and probe.attached
        train(model, optimizer, scheduler, data, 5, batch_size=16)
        assert probe.global_step == 5
        assert repr(probe) == f"Probe(out={str(probe.out)!r}, step=5, snapshots=2)"
    assert not probe.attached
    assert load_run(tmp_path / "ok").status == "closed"
    with pytest.raises(KeyError):
        with Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "failed", eval_max=32,
                   progress=False):
            raise KeyError("the loop broke")
    run = load_run(tmp_path / "failed")
    assert run.status == "failed" and "KeyError" in run.manifest["status_reason"]


def test_the_exit_handler_closes_the_probes_left_open_and_only_those(tmp_path):
    model, optimizer, _, data = mlp_setup()
    left_open = Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "open", eval_max=16,
                      progress=False)
    other_model, other_optimizer, _, _ = mlp_setup(seed=1)
    closed = Probe(other_model, other_optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "closed",
                   eval_max=16, progress=False)
    closed.close()
    closed_manifest = (tmp_path / "closed" / MANIFEST).read_bytes()
    core._close_open_probes()
    assert not left_open.attached and load_run(tmp_path / "open").status == "closed"
    assert (tmp_path / "closed" / MANIFEST).read_bytes() == closed_manifest  # not touched again
