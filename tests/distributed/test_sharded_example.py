"""The torchrun line of docs/distributed.md, as written: ``examples/fsdp_mnist1d.py`` on 2 gloo CPU processes
(``python -m torch.distributed.run`` is the ``torchrun`` command), then its run directory read on one process: the
final θ loaded into an unsharded MLP gives the run's eval accuracy, and C matches float64 from the whole vectors."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import dynprobe
from dynprobe.distributed.sharded import is_sharded

pytest.importorskip("mnist1d")
fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 300


def torchrun_line() -> list[str]:
    """The documented command (the one ``torchrun`` line of docs/distributed.md)."""
    lines = re.findall(r"^torchrun .*examples/fsdp_mnist1d\.py.*$", (ROOT / "docs" / "distributed.md").read_text(),
                       re.M)
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_the_documented_torchrun_line_writes_a_run_that_reads_back_whole(tmp_path: Path) -> None:
    command = torchrun_line()
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    script = command.index("examples/fsdp_mnist1d.py")
    argv = [sys.executable, "-m", "torch.distributed.run", *command[1:script], str(ROOT / command[script]),
            *command[script + 1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / command[command.index("--out") + 1]
    steps = int(command[command.index("--steps") + 1])
    assert f"run: {command[command.index('--out') + 1]}" in result.stdout

    run = dynprobe.load_run(out)
    assert run.status == "closed" and run.steps[0] == 0 and run.steps[-1] == steps
    assert run.manifest["distributed"]["world_size"] == 2
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"
    # ghosts: the ε = 0 control is the main run at every snapshot; the perturbed ghosts were compared too
    assert not [e for e in run.events if e.get("event") in ("probe_error", "control_drift")]
    control = [i for i, g in enumerate(run.ghosts) if g.control]
    assert len(run.ghosts) == 3 and len(control) == 1
    assert np.all(run.chaos["L2"][control[0]] == 0)
    assert np.all(run.chaos["L2"][[i for i in range(3) if i not in control], -1] > 0)
    assert "L2 to the main run at the end" in result.stdout
    # The final θ in an unsharded MLP: its accuracy on the run's eval examples is the run's.
    from dynprobe.recipes.mnist1d import MLP, load_mnist1d

    data = load_mnist1d(num_samples=2000)
    model = MLP(width=128)
    assert not is_sharded(model)
    model.load_state_dict({name: torch.as_tensor(np.asarray(value)) for name, value in
                           run.state_dict(snapshot_index=-1).items()})
    chosen = torch.as_tensor(np.asarray(run.eval_indices))
    with torch.no_grad():
        predictions = model(data.x_test[chosen]).argmax(1)
    assert run.eval_accuracy[-1] == pytest.approx(float((predictions == data.y_test[chosen]).double().mean()),
                                                  abs=1e-12)
    vectors = np.stack([np.asarray(run.params(snapshot_index=i), dtype=np.float64) for i in range(len(run.steps))])
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    reference = 0.5 * ((units[:, None, :] - units[None, :, :]) ** 2).sum(-1)
    lower = np.tril_indices(len(run.steps), -1)
    np.testing.assert_allclose(run.C[lower], reference[lower], rtol=1e-9, atol=0)
