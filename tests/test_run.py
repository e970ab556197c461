"""load_run: the read-only view, its errors, and reconstructing a state dict."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe import RunFormatError

from .conftest import cnn_setup, train


@pytest.fixture()
def cnn_run(tmp_path):
    model, optimizer, scheduler, data = cnn_setup()
    with dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=tmp_path / "r", schedule=4):
        train(model, optimizer, scheduler, data, 8)
    return model, data, dynprobe.load_run(tmp_path / "r")


def test_run_arrays_have_the_documented_shapes(cnn_run):
    _, data, run = cnn_run
    T = len(run)
    assert run.steps.dtype == np.int64 and list(run.steps) == [0, 4, 8]
    assert run.C.shape == run.D.shape == (T, T)
    assert run.eval_loss.shape == run.eval_accuracy.shape == run.train_loss.shape == run.lr.shape == (T,)
    assert run.predictions(0).shape == (data.x_test.shape[0],)
    assert np.allclose(np.diag(run.C), 0) and np.allclose(run.C, run.C.T)


def test_state_dict_restores_the_model_exactly(cnn_run):
    model, data, run = cnn_run
    fresh, *_ = cnn_setup(seed=99)
    fresh.load_state_dict(run.state_dict(run.index_of(8)))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_index_of_unknown_step_names_the_nearest(cnn_run):
    *_, run = cnn_run
    with pytest.raises(KeyError, match=r"nearest recorded steps: \[4, 8\]"):
        run.index_of(6)


def test_materialized_matrices_equal_the_row_files(cnn_run):
    *_, run = cnn_run
    np.testing.assert_array_equal(np.load(run.path / "metrics" / "C.npy"), run.C)


def test_load_run_on_a_non_run_directory(tmp_path):
    with pytest.raises(RunFormatError, match="not a dynprobe run"):
        dynprobe.load_run(tmp_path)


def test_load_run_on_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFormatError, match="is a file"):
        dynprobe.load_run(tmp_path / "f")


def test_corrupted_arrays_raise_a_clear_error(cnn_run):
    *_, run = cnn_run
    (run.path / "snapshots" / "step_00000004" / "preds.npy").write_bytes(b"not an array")
    with pytest.raises(RunFormatError, match="damaged"):
        dynprobe.load_run(run.path).predictions(1)
