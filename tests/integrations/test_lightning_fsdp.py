"""The Lightning callback under FSDP2: ``ModelParallelStrategy`` (the LightningModule's ``configure_model`` calls
``fully_shard``) on 2 gloo CPU processes. Lightning's ``FSDPStrategy`` wraps the module in FSDP1 and is refused.

Each rank runs ``Trainer.fit`` in a process spawned by :mod:`tests.spawned` (its process group already exists, so
Lightning joins it; ``LOCAL_RANK`` in the environment tells Lightning the processes were started outside it). The
fit through the callback leaves every rank's local shards and the RNG bit-for-bit as without it; the run's
parameters are the gathered module's, C matches a float64 computation from those whole vectors, and the last
snapshot's eval accuracy and disagreement match the module's own predictions.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

import dynprobe  # noqa: E402
from dynprobe.integrations.lightning import DynprobeCallback  # noqa: E402

from .. import spawned  # noqa: E402
from .test_lightning import TinyClassifier, _data  # noqa: E402

WORLD = 2
STEPS = 12
SCHEDULE = [0, 1, 2, 4, 8, 12]
DEADLINE_S = 240.0


class ShardedClassifier(TinyClassifier):
    """The test module of test_lightning.py (MLP with dropout, SGD momentum), sharded in ``configure_model``."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(self.net, mesh=mesh)


def lightning_environment(rank: int) -> None:
    """What a launcher (torchrun) sets: Lightning then joins the spawned process group instead of starting one."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")  # unused: the process group exists


def _fit(root: Path, callback: DynprobeCallback | None, strategy: object = None) -> tuple[nn.Module, torch.Tensor]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(7, verbose=False)
    module = ShardedClassifier()
    train = torch.utils.data.DataLoader(_data(0), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(_data(1, 96), batch_size=32)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=WORLD, logger=False, enable_checkpointing=False,
        strategy=strategy or ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(root), callbacks=[callback] if callback is not None else [],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return module, torch.get_rng_state()


def _local_shards(module: nn.Module) -> list[list[float]]:
    return [p.to_local().detach().reshape(-1).tolist() for p in module.parameters()]


def _predictions(module: nn.Module, x: torch.Tensor) -> list[int]:
    module.eval()
    with torch.no_grad():
        predictions = module(x).argmax(1).tolist()  # collective: every rank runs it
    module.train()
    return predictions


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_model_parallel(rank: int, folder: Path, result: dict) -> None:
    lightning_environment(rank)
    val_x = _data(1, 96).tensors[0]
    pl.seed_everything(7, verbose=False)
    result["initial_predictions"] = _predictions(TinyClassifier(), val_x)  # the same initialization, unsharded
    bare, bare_rng = _fit(folder / "bare", None)
    callback = DynprobeCallback(out=folder / "run", schedule=SCHEDULE, errors="raise", progress=False)
    module, rng = _fit(folder / "probed", callback)
    result["bitwise"] = _local_shards(module) == _local_shards(bare)
    result["rng"] = torch.equal(rng, bare_rng)
    result["names"] = [f"module.{name}" for name, _ in module.named_parameters()]
    result["final_full"] = torch.cat([p.full_tensor().detach().reshape(-1) for p in module.parameters()]).tolist()
    result["final_predictions"] = _predictions(module, val_x)
    result["writer"] = type(callback.probe.writer).__name__


def scenario_model_parallel_ghosts(rank: int, folder: Path, result: dict) -> None:
    """Ghosts through the callback under ModelParallelStrategy: sharded replicas replaying ``training_step``."""
    lightning_environment(rank)
    bare, _ = _fit(folder / "bare", None)
    callback = DynprobeCallback(out=folder / "ghosts", schedule=SCHEDULE, errors="raise", progress=False,
                                ghosts=dynprobe.Ghosts(at=[0, 4]))
    module, _ = _fit(folder / "probed", callback)
    result["bitwise"] = _local_shards(module) == _local_shards(bare)


class _FitState:
    """What ``on_fit_start`` reads of a Trainer (Lightning's FSDPStrategy cannot start a fit on the CPU)."""

    def __init__(self, optimizer: torch.optim.Optimizer, root: Path) -> None:
        self.optimizers, self.max_steps, self.global_step, self.accumulate_grad_batches = [optimizer], STEPS, 0, 1
        self.log_dir = self.default_root_dir = str(root)


def scenario_fsdp1_strategy(rank: int, folder: Path, result: dict) -> None:
    """Lightning's FSDPStrategy requires a GPU ("The strategy `fsdp` requires a GPU accelerator", and its
    ``_setup_model`` passes ``device_id=root_device.index``, None on the CPU), so the fit cannot run here: the
    LightningModule is wrapped as that ``_setup_model`` wraps it (FSDP1 around the whole module, the strategy's
    sharding strategy), on the CPU, and the callback's ``on_fit_start`` is called as the Trainer calls it."""
    from lightning.pytorch.strategies import FSDPStrategy

    lightning_environment(rank)
    strategy = FSDPStrategy()
    pl.seed_everything(7, verbose=False)
    module = TinyClassifier()
    wrapped = fsdp.FullyShardedDataParallel(module=module, sharding_strategy=strategy.sharding_strategy,
                                            device_id=torch.device("cpu"), **strategy.kwargs)
    result["wrapped_in"] = type(wrapped).__name__
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    x, y = _data(1, 32).tensors
    callback = DynprobeCallback(out=folder / "refused", eval_data=(x, y), progress=False)
    try:
        callback.on_fit_start(_FitState(optimizer, folder), module)
    except ValueError as error:
        result["error"] = str(error)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # nothing was left half-done
    result["after"] = float(flag)


def scenario_docs_snippet(rank: int, folder: Path, result: dict) -> None:
    """The Lightning snippet of docs/distributed.md, as written (tests/test_docs.py runs this scenario)."""
    import lightning

    from tests.test_docs import _snippet

    lightning_environment(rank)
    os.chdir(folder)

    class DataModule(lightning.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(_data(0), batch_size=16, shuffle=True)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(_data(1, 96), batch_size=32)

    namespace = {"lightning": lightning, "torch": torch, "Classifier": TinyClassifier, "datamodule": DataModule()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_snippet("ModelParallelStrategy("), "docs/distributed.md Lightning snippet", "exec"), namespace)
    result["out"] = str(namespace["trainer"].callbacks[0].probe.out) if rank == 0 else None


SCENARIOS = {"model_parallel": scenario_model_parallel, "fsdp1_strategy": scenario_fsdp1_strategy,
             "docs_snippet": scenario_docs_snippet, "model_parallel_ghosts": scenario_model_parallel_ghosts}


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=DEADLINE_S)


# ---------------------------------------------------------------------------------------------- tests


def cosine_reference(vectors: np.ndarray) -> np.ndarray:
    """eq. (1) in float64 from whole vectors, as ½‖x̂ − ŷ‖² (no cancellation for small C)."""
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.array([[0.5 * np.sum((a - b) ** 2) for b in units] for a in units])


def test_model_parallel_fit_is_bitwise_unchanged_and_its_run_matches_the_module(tmp_path: Path) -> None:
    results = run_spawned("model_parallel", tmp_path)
    for result in results:
        assert result["bitwise"], "the callback changed a rank's shards"
        assert result["rng"], "the callback changed the global RNG"
    assert [r["writer"] for r in results] == ["RunWriter", "NullSink"]
    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and list(run.steps) == SCHEDULE
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"
    assert run.manifest["distributed"]["world_size"] == WORLD
    # The run's θ is the gathered module's, in its parameter order, named as the unsharded callback names it.
    final = np.asarray(results[0]["final_full"], dtype=np.float32)
    assert np.array_equal(run.params(snapshot_index=-1), final)
    assert list(run.state_dict(snapshot_index=-1)) == results[0]["names"]
    # C against float64 from the whole vectors read back.
    vectors = np.stack([np.asarray(run.params(snapshot_index=i), dtype=np.float64) for i in range(len(run.steps))])
    reference = cosine_reference(vectors)
    lower = np.tril_indices(len(run.steps), -1)
    np.testing.assert_allclose(run.C[lower], reference[lower], rtol=1e-9, atol=0)
    assert np.all(np.diag(run.C) == 0)
    # The last snapshot's predictions are the module's: accuracy and D to the initialization.
    x, y = _data(1, 96).tensors
    chosen = np.asarray(run.eval_indices)
    final_predictions = np.asarray(results[0]["final_predictions"])[chosen]
    initial_predictions = np.asarray(results[0]["initial_predictions"])[chosen]
    assert run.eval_accuracy[-1] == pytest.approx(np.mean(final_predictions == y.numpy()[chosen]), abs=1e-12)
    assert run.D[-1, 0] == pytest.approx(np.mean(final_predictions != initial_predictions), abs=1e-12)
    assert run.D[-1, 0] > 0


def test_ghosts_through_the_callback_under_model_parallel_strategy(tmp_path: Path) -> None:
    results = run_spawned("model_parallel_ghosts", tmp_path)
    assert all(result["bitwise"] for result in results), "the ghosts changed a rank's shards"
    run = dynprobe.load_run(tmp_path / "ghosts")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") in ("probe_error",
                                                                                     "control_drift")]
    compares = [e for e in run.events if e.get("event") == "ghost_compare"]
    control = [e for e in compares if e["ghost"] == 0]
    perturbed = [e for e in compares if e["ghost"] != 0]
    assert [e["step"] for e in control] == SCHEDULE and all(e["L2"] == 0 and e["C"] == 0 for e in control)
    assert {e["ghost"] for e in perturbed} == {1, 2} and all(e["L2"] > 0 for e in perturbed if e["step"] > 4)
    assert not [e for e in run.events if e.get("event") == "ghost_status" and e["status"] != "finished"]


def test_lightning_fsdp_strategy_is_fsdp1_and_refused_on_every_rank(tmp_path: Path) -> None:
    results = run_spawned("fsdp1_strategy", tmp_path)
    assert {result["wrapped_in"] for result in results} == {"FullyShardedDataParallel"}
    messages = {result.get("error") for result in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message is not None and "FSDP1" in message
    assert "ModelParallelStrategy" in message and "not FSDPStrategy" in message
    assert all(result["after"] == WORLD for result in results)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
