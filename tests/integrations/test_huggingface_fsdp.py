"""The Hugging Face callback and a plain Accelerate loop under FSDP2 (Accelerate's
``FullyShardedDataParallelPlugin(fsdp_version=2)``: ``fully_shard``), on 2 gloo CPU processes; FSDP1
(``fsdp_version=1``) is refused on every rank.

Accelerate enables FSDP only on accelerator devices: on the CPU an ``fsdp_plugin`` is dropped and the model is
wrapped in DDP (``DistributedType.MULTI_CPU``) or not at all. :func:`fsdp_on_the_cpu` sets the Accelerator's state to
FSDP with the plugin it was given, right after it is built, so that Accelerate's own preparation
(``fsdp2_prepare_model``: ``fully_shard`` of the transformer blocks and the root, the optimizer switched to the
shards) runs on the CPU; everything after that is the Trainer's and Accelerate's code unchanged. Training through
the callback leaves every rank's local shards bit-for-bit as without it; the run's θ is the gathered model's, C
matches float64 from those whole vectors and the eval accuracy the model's own predictions.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(fsdp, "fully_shard"),
                                reason="torch.distributed FSDP2 is not available")

import dynprobe  # noqa: E402
from dynprobe.integrations.huggingface import DynprobeCallback  # noqa: E402

from .. import spawned  # noqa: E402
from .test_huggingface import _eval_batch, _examples, _model  # noqa: E402
from .test_lightning_fsdp import cosine_reference  # noqa: E402

WORLD = 2
STEPS = 8
SCHEDULE = [0, 1, 2, 4, 8]
DEADLINE_S = 300.0


def fsdp_on_the_cpu(rank: int) -> None:
    """The launcher's environment, and an Accelerator that keeps its ``fsdp_plugin`` on the CPU (module
    docstring): its state is switched to FSDP with that plugin after ``Accelerator.__init__``."""
    from accelerate.utils import DistributedType

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")  # unused: the process group exists
    original = accelerate.Accelerator.__init__
    if getattr(original, "_fsdp_on_the_cpu", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.state.distributed_type != DistributedType.FSDP:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = fsdp_plugin

    init._fsdp_on_the_cpu = True
    accelerate.Accelerator.__init__ = init


def _train(root: Path, callback: DynprobeCallback | None) -> nn.Module:
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(root), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=5e-3, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_examples(128, seed=0),
                                   callbacks=[callback] if callback is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer.model


def _local_shards(model: nn.Module) -> list[list[float]]:
    return [p.to_local().detach().reshape(-1).tolist() for p in model.parameters()]


def _full_vector(model: nn.Module) -> list[float]:
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).tolist()


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_trainer(rank: int, folder: Path, result: dict) -> None:
    fsdp_on_the_cpu(rank)
    bare = _train(folder / "bare", None)
    callback = DynprobeCallback(eval_data=_eval_batch(), out=folder / "run", schedule=SCHEDULE, errors="raise",
                                progress=False)
    model = _train(folder / "probed", callback)
    result["sharded"] = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    result["bitwise"] = _local_shards(model) == _local_shards(bare)
    result["final_full"] = _full_vector(model)
    result["names"] = [name for name, _ in model.named_parameters()]
    model.eval()
    with torch.no_grad():  # collective: every rank runs it
        result["final_predictions"] = model(input_ids=_eval_batch()["input_ids"]).logits.argmax(1).tolist()


def scenario_accelerate_loop(rank: int, folder: Path, result: dict) -> None:
    """A plain Accelerate loop: the probe takes the torch optimizer inside Accelerate's wrapper."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    fsdp_on_the_cpu(rank)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    y = x[:, :3].argmax(1)

    def train(out: Path | None) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))
        accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9))
        criterion = nn.CrossEntropyLoss()
        probe = None
        if out is not None:
            probe = dynprobe.Probe(model, optimizer.optimizer, eval_data=(x[64:], y[64:]), out=out,
                                   schedule=SCHEDULE, errors="raise", progress=False)
            criterion = probe.watch(criterion)
        shard = slice(rank * 8, rank * 8 + 8)
        for step in range(STEPS):
            batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
            loss = criterion(model(x[batch][shard]), y[batch][shard])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
        if probe is not None:
            probe.close()
        return model

    bare = train(None)
    model = train(folder / "run")
    result["sharded"] = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    result["bitwise"] = _local_shards(model) == _local_shards(bare)
    result["final_full"] = _full_vector(model)


def scenario_fsdp1(rank: int, folder: Path, result: dict) -> None:
    """``fsdp_config={"version": 1}``: Accelerate's FSDP1 wrapping does not run on the CPU ("Inconsistent compute
    device and `device_id`: cpu vs cpu:0"), so the model is wrapped as Accelerate wraps it (FSDP1 around the
    whole model, which the Trainer then hands to callbacks) on the CPU, and ``on_train_begin`` is called as the
    Trainer calls it."""
    fsdp_on_the_cpu(rank)
    model = fsdp.FullyShardedDataParallel(_model(), device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    args = transformers.TrainingArguments(output_dir=str(folder), max_steps=STEPS, use_cpu=True, report_to=[])
    state = transformers.TrainerState(max_steps=STEPS)
    callback = DynprobeCallback(eval_data=_eval_batch(), out=folder / "refused", progress=False)
    try:
        callback.on_train_begin(args, state, transformers.TrainerControl(), model=model, optimizer=optimizer)
    except ValueError as error:
        result["error"] = str(error)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # nothing was left half-done
    result["after"] = float(flag)


def scenario_docs_snippet(rank: int, folder: Path, result: dict) -> None:
    """The Hugging Face snippet of docs/distributed.md, as written (tests/test_docs.py runs this scenario)."""
    from tests.test_docs import _snippet

    fsdp_on_the_cpu(rank)
    os.chdir(folder)
    eval_batch = _eval_batch()
    namespace = {"dynprobe": dynprobe, "model": _model(), "train": _examples(64, seed=0),
                 "inputs": {"input_ids": eval_batch["input_ids"]}, "labels": eval_batch["labels"]}
    code = _snippet('fsdp_config={"version": 2,')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/distributed.md Hugging Face snippet", "exec"), namespace)
    result["sharded"] = all(isinstance(p, torch.distributed.tensor.DTensor) for p in namespace["model"].parameters())


def scenario_trainer_ghosts(rank: int, folder: Path, result: dict) -> None:
    """Ghosts through the callback with the Trainer's FSDP2 (a BERT: attention masks, dropout, AdamW)."""
    fsdp_on_the_cpu(rank)
    bare = _train(folder / "bare", None)
    callback = DynprobeCallback(eval_data=_eval_batch(), out=folder / "ghosts", schedule=SCHEDULE, errors="raise",
                                progress=False, ghosts=dynprobe.Ghosts(at=[0]))
    model = _train(folder / "probed", callback)
    result["bitwise"] = _local_shards(model) == _local_shards(bare)


SCENARIOS = {"trainer": scenario_trainer, "accelerate_loop": scenario_accelerate_loop, "fsdp1": scenario_fsdp1,
             "docs_snippet": scenario_docs_snippet, "trainer_ghosts": scenario_trainer_ghosts}


def run_spawned(scenario: str, folder: Path) -> list[dict]:
    return spawned.run_spawned(__name__, scenario, folder, world=WORLD, deadline_s=DEADLINE_S)


# ---------------------------------------------------------------------------------------------- tests


def _check_c_against_float64(run: dynprobe.Run) -> None:
    vectors = np.stack([np.asarray(run.params(snapshot_index=i), dtype=np.float64) for i in range(len(run.steps))])
    reference = cosine_reference(vectors)
    lower = np.tril_indices(len(run.steps), -1)
    np.testing.assert_allclose(run.C[lower], reference[lower], rtol=1e-9, atol=0)
    assert np.all(np.diag(run.C) == 0) and run.C[-1, 0] > 0


def test_trainer_with_fsdp2_is_bitwise_unchanged_and_its_run_matches_the_model(tmp_path: Path) -> None:
    results = run_spawned("trainer", tmp_path)
    for result in results:
        assert result["sharded"], "Accelerate did not fully_shard the model"
        assert result["bitwise"], "the callback changed a rank's shards"
    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and list(run.steps) == SCHEDULE
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"
    assert np.array_equal(run.params(snapshot_index=-1), np.asarray(results[0]["final_full"], dtype=np.float32))
    assert [p["name"] for p in run.manifest["model"]["parameters"]] == results[0]["names"]
    _check_c_against_float64(run)
    labels = _eval_batch()["labels"].numpy()[np.asarray(run.eval_indices)]
    predictions = np.asarray(results[0]["final_predictions"])[np.asarray(run.eval_indices)]
    assert run.eval_accuracy[-1] == pytest.approx(np.mean(predictions == labels), abs=1e-12)


def test_ghosts_through_the_trainer_callback_under_fsdp2(tmp_path: Path) -> None:
    results = run_spawned("trainer_ghosts", tmp_path)
    assert all(result["bitwise"] for result in results), "the ghosts changed a rank's shards"
    run = dynprobe.load_run(tmp_path / "ghosts")
    assert run.status == "closed" and not [e for e in run.events if e.get("event") in ("probe_error",
                                                                                     "control_drift")]
    compares = [e for e in run.events if e.get("event") == "ghost_compare"]
    assert [e["step"] for e in compares if e["ghost"] == 0] == SCHEDULE
    assert all(e["L2"] == 0 and e["D"] == 0 for e in compares if e["ghost"] == 0)  # the control: bit for bit
    assert all(e["L2"] > 0 for e in compares if e["ghost"] == 1 and e["step"] > 0)


def test_a_plain_accelerate_loop_with_fsdp2_is_bitwise_unchanged(tmp_path: Path) -> None:
    results = run_spawned("accelerate_loop", tmp_path)
    assert all(result["sharded"] and result["bitwise"] for result in results)
    run = dynprobe.load_run(tmp_path / "run")
    assert run.status == "closed" and list(run.steps) == SCHEDULE
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"
    assert np.array_equal(run.params(snapshot_index=-1), np.asarray(results[0]["final_full"], dtype=np.float32))
    _check_c_against_float64(run)


def test_accelerate_fsdp_version_1_is_refused_on_every_rank(tmp_path: Path) -> None:
    results = run_spawned("fsdp1", tmp_path)
    messages = {result.get("error") for result in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message is not None and "FSDP1" in message
    assert "FullyShardedDataParallelPlugin(fsdp_version=2)" in message and "fsdp_config={'version': 2}" in message
    assert all(result["after"] == WORLD for result in results)
