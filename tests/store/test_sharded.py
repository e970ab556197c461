"""FSDP2 snapshots on the read side (dynprobe.store.sharded): shards written by one process read back as vec(θ) in
manifest order and storage dtype; where θ is stored as shards; and an environment that cannot read them (no
safetensors, no DCP safetensors storage) gets a RunFormatError naming the folder and the fix, never a bare
ImportError. The multi-rank round trip runs in tests/distributed/test_sharded.py."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from dynprobe.store import sharded
from dynprobe.store.files import RunFormatError
from dynprobe.store.layout import PARAMS, sharded_params_dir, snapshot_file

MANIFEST = {"model": {"parameters": [{"name": "w", "shape": [2, 3], "dtype": "float32", "numel": 6}]}}


def test_a_snapshot_has_sharded_params_exactly_when_its_params_dcp_folder_exists(tmp_path):
    snapshot_file(tmp_path, 4, PARAMS).parent.mkdir(parents=True)
    snapshot_file(tmp_path, 4, PARAMS).write_bytes(b"")
    assert not sharded.has_sharded_params(tmp_path, 4)
    assert sharded_params_dir(tmp_path, 8).relative_to(tmp_path).parts[:2] == ("snapshots", "step_00000008")
    sharded_params_dir(tmp_path, 8).mkdir(parents=True)
    assert sharded.has_sharded_params(tmp_path, 8) and not sharded.has_sharded_params(tmp_path, 12)


def test_without_safetensors_the_problem_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sharded.importlib.util, "find_spec",
                        lambda name, *a: None if name == "safetensors" else real(name, *a))
    if sharded.dcp is not None:
        assert "pip install safetensors" in sharded.sharded_checkpoints_problem()
    monkeypatch.setattr(sharded, "dcp", None)
    assert "upgrade PyTorch" in sharded.sharded_checkpoints_problem()  # checked first: nothing else can help


def test_an_environment_that_cannot_read_shards_raises_a_format_error_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sharded, "sharded_checkpoints_problem", lambda: "install the safetensors package")
    folder = sharded_params_dir(tmp_path, 8)
    with pytest.raises(RunFormatError, match=rf"{folder}: install the safetensors package"):
        sharded.load_sharded_params(tmp_path, MANIFEST, 8)
    with pytest.raises(RuntimeError, match="install the safetensors package"):
        sharded.save_sharded_params(tmp_path, 8, {})


NEEDS_DCP = pytest.mark.skipif(sharded.sharded_checkpoints_problem() is not None,
                               reason="needs DCP's safetensors storage")


def write_single_process_shards(root, step: int, state: dict[str, torch.Tensor]) -> None:
    writer = sharded.HuggingFaceStorageWriter(str(sharded_params_dir(root, step)), save_distributed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        sharded.dcp.save(state, storage_writer=writer, no_dist=True)


@NEEDS_DCP
def test_shards_read_back_as_theta_in_manifest_order_and_storage_dtype(tmp_path):
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7
    bias = torch.tensor([1 / 3, -2.5], dtype=torch.float64)
    head = torch.tensor([9.0, 10.0, 11.0])
    write_single_process_shards(tmp_path, 8, {"layer.weight": weight, "layer.bias": bias, "head.x": head})
    specs = [{"name": "layer.bias", "shape": [2], "dtype": "float64"},  # the manifest's order: neither the file's
             {"name": "head.x", "shape": [3], "dtype": "float32"},  # nor the alphabetical one
             {"name": "layer.weight", "shape": [2, 3], "dtype": "float32"}]
    theta = sharded.load_sharded_params(tmp_path, {"model": {"storage_dtype": "float64", "parameters": specs}}, 8)
    expected = np.concatenate([bias.numpy(), head.numpy().astype(np.float64),
                               weight.numpy().astype(np.float64).reshape(-1)])
    assert theta.dtype == np.float64 and np.array_equal(theta, expected)
    as_float32 = sharded.load_sharded_params(tmp_path, {"model": {"parameters": specs}}, 8)
    assert as_float32.dtype == np.float32 and np.array_equal(as_float32, expected.astype(np.float32))
    wrong = [{"name": "layer.weight", "shape": [3, 2], "dtype": "float32"}]
    with pytest.raises(RunFormatError, match=r"'layer.weight' of shape \(3, 2\) is not in the shards "
                                             r"\(found \(2, 3\)\)"):
        sharded.load_sharded_params(tmp_path, {"model": {"parameters": wrong}}, 8)


@NEEDS_DCP
def test_a_folder_without_shards_is_a_format_error(tmp_path):
    sharded_params_dir(tmp_path, 8).mkdir(parents=True)
    with pytest.raises(RunFormatError, match="cannot be read|is not in the shards"):
        sharded.load_sharded_params(tmp_path, MANIFEST, 8)
