"""The Lightning callback: a fit with ``DynprobeCallback`` gives the same run directory properties as the plain-loop
path (C/D/S rows, ghost maps, an ε = 0 control at exactly 0) and leaves the training bit-for-bit unchanged, with
gradient accumulation and with the trainer's gradient clipping."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import dynprobe  # noqa: E402
from dynprobe.config import Barriers  # noqa: E402
from dynprobe.integrations.lightning import DynprobeCallback, LightningStepModel  # noqa: E402

STEPS = 24


class TinyClassifier(pl.LightningModule):
    """An MLP with dropout (ghosts must replay the masks) whose training_step logs (a no-op in ghosts)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
        self.lr = lr
        self.logged_in_training = 0
        self.losses: list[tuple[int, float]] = []  # (the step it trains, training_step's loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.logged_in_training += 1
        self.losses.append((self.global_step + 1, float(loss)))
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def _data(seed: int = 0, n: int = 256) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=generator)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return torch.utils.data.TensorDataset(x, y)


def _fit(tmp_path, callback=None, *, accumulate: int = 1, clip: float | None = None, algorithm: str = "norm",
         max_steps: int = STEPS):
    pl.seed_everything(7, verbose=False)
    module = TinyClassifier()
    # The loader shuffles with the global RNG: any RNG disturbance by the probe would change the batches.
    train = torch.utils.data.DataLoader(_data(0), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(_data(1, 96), batch_size=32)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=True, default_root_dir=str(tmp_path), accumulate_grad_batches=accumulate,
        gradient_clip_val=clip, gradient_clip_algorithm=algorithm if clip else None,
        callbacks=[callback] if callback is not None else [],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, train, val)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return module, trainer, state, torch.get_rng_state()


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _check_run(run, *, kernel: bool) -> None:
    T = len(run.steps)
    assert T >= 5 and run.steps[0] == 0 and run.steps[-1] == STEPS
    assert np.all(np.isfinite(np.diag(run.C))) and np.all(np.diag(run.C) == 0)
    assert np.all(np.isfinite(np.tril(run.C)[np.tril_indices(T)]))
    assert run.C[-1, 0] > 0 and np.isfinite(run.D[-1, 0])
    if kernel:
        assert run.has_kernels and np.isfinite(run.S[-1, 0]) and run.S[-1, 0] > 0


def test_fit_with_ghosts_and_kernel_is_bitwise_unchanged_and_control_stays_exact(tmp_path):
    _, _, reference, rng_reference = _fit(tmp_path / "plain")
    callback = DynprobeCallback(
        schedule=[0, 1, 2, 4, 8, 12, 16, 20, 24], kernel=dynprobe.KernelConfig(n=16),
        ghosts=dynprobe.Ghosts(at=[0, 8], perturbation=dynprobe.Perturbation(1e-4, "l2")),
        barriers=Barriers(alphas=5), errors="raise",
    )
    module, trainer, state, rng = _fit(tmp_path / "probed", callback)
    _assert_bitwise(reference, state)
    assert torch.equal(rng, rng_reference)
    assert callback.probe.out == tmp_path / "probed" / "dynprobe"  # logger=False: the default root dir
    run = dynprobe.load_run(callback.probe.out)
    assert run.status == "closed"
    _check_run(run, kernel=True)
    assert not [e for e in run.events if e["event"] in ("control_drift", "probe_error", "grad_edit_detected")]
    control = [g for g in run.ghosts if g.control]
    perturbed = [g for g in run.ghosts if not g.control]
    assert len(control) == 1 and len(perturbed) == 2
    c = control[0].ghost_id
    for name in ("C", "L2", "D"):
        values = run.chaos[name][c][np.isfinite(run.chaos[name][c])]
        assert values.size == len(run.steps) and np.all(values == 0), name
    late = perturbed[-1].ghost_id
    assert np.isnan(run.chaos["C"][late][run.steps < 8]).all()
    assert np.all(run.chaos["C"][perturbed[0].ghost_id][1:] > 0)
    # The main module logged every training step; ghosts' self.log calls were no-ops on their copies.
    assert module.logged_in_training == STEPS
    assert "train_loss" in trainer.callback_metrics


def test_run_parameters_match_the_lightning_module(tmp_path):
    callback = DynprobeCallback(schedule=[0, STEPS])
    module, _, state, _ = _fit(tmp_path, callback)
    run = dynprobe.load_run(callback.probe.out)
    final = run.state_dict(snapshot_index=-1)
    for name, tensor in module.named_parameters():
        assert torch.equal(final[f"module.{name}"], tensor.detach())


@pytest.mark.parametrize("accumulate,clip,algorithm", [(3, None, "norm"), (1, 0.05, "norm"), (2, 0.01, "value")])
def test_accumulation_and_clipping_keep_training_unchanged_and_control_exact(tmp_path, accumulate, clip, algorithm):
    _, _, reference, _ = _fit(tmp_path / "plain", accumulate=accumulate, clip=clip, algorithm=algorithm,
                              max_steps=12)
    callback = DynprobeCallback(schedule=dynprobe.schedule.every(3),
                                ghosts=dynprobe.Ghosts(at=[0]), barriers=Barriers(ghosts=False), errors="raise")
    _, trainer, state, _ = _fit(tmp_path / "probed", callback, accumulate=accumulate, clip=clip, algorithm=algorithm,
                                max_steps=12)
    _assert_bitwise(reference, state)
    run = dynprobe.load_run(callback.probe.out)
    assert run.steps[-1] == trainer.global_step == 12
    assert not [e for e in run.events if e["event"] in ("control_drift", "probe_error", "grad_edit_detected")]
    config = run.config["ghosts"]
    assert config["clip_grad_norm"] == (clip if clip and algorithm == "norm" else None)
    assert config["clip_grad_value"] == (clip if clip and algorithm == "value" else None)
    c = next(g.ghost_id for g in run.ghosts if g.control)
    p = next(g.ghost_id for g in run.ghosts if not g.control)
    assert np.all(run.chaos["C"][c] == 0) and np.all(run.chaos["L2"][c] == 0)
    assert run.chaos["C"][p][-1] > 0


@pytest.mark.parametrize("accumulate, with_ghosts", [(1, False), (3, True)])
def test_train_loss_is_the_mean_training_step_loss_since_the_previous_snapshot(tmp_path, accumulate, with_ghosts):
    callback = DynprobeCallback(schedule=[0, 3, 7, 12], errors="raise", barriers=Barriers(ghosts=False),
                                ghosts=dynprobe.Ghosts(at=[0]) if with_ghosts else None)
    module, _, _, _ = _fit(tmp_path, callback, accumulate=accumulate, max_steps=12)
    run = dynprobe.load_run(callback.probe.out)
    # The main module's calls only (ghosts append to their copies); an epoch of 16 batches ends with a short
    # accumulation window, so a step has up to `accumulate` calls.
    assert {s for s, _ in module.losses} == set(range(1, 13)) and len(module.losses) <= 12 * accumulate
    assert np.isnan(run.train_loss[0])
    previous = 0
    for k, step in enumerate(run.steps[1:], start=1):
        losses = [loss for s, loss in module.losses if previous < s <= step]
        assert run.train_loss[k] == pytest.approx(np.mean(losses), rel=1e-6)  # not divided by accumulation
        previous = int(step)


def test_undeclared_clipping_would_be_caught_by_the_control(tmp_path, monkeypatch):
    """The negative control of the clipping test: a ghost that does not clip drifts (so the test above can fail)."""
    import dynprobe.integrations.lightning as integration

    monkeypatch.setattr(integration, "declared_clipping",
                        lambda value, algorithm: {"clip_grad_norm": None, "clip_grad_value": None})
    callback = DynprobeCallback(schedule=dynprobe.schedule.every(4), ghosts=dynprobe.Ghosts(at=[0]),
                                barriers=Barriers(ghosts=False))
    with pytest.warns(RuntimeWarning, match="control ghost drifted"):
        _fit(tmp_path, callback, clip=0.05, max_steps=8)
    run = dynprobe.load_run(callback.probe.out)
    assert [e for e in run.events if e["event"] == "control_drift"]


def test_bad_options_fail_when_the_callback_is_built():
    with pytest.raises(TypeError, match="unknown option"):
        DynprobeCallback(kernal=dynprobe.KernelConfig())
    with pytest.raises(TypeError, match="finds the model"):
        DynprobeCallback(model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exporters="):
        DynprobeCallback(exporters=["tensorbored"])


def test_ghosts_with_manual_optimization_are_a_clear_error(tmp_path):
    class Manual(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[DynprobeCallback(eval_data=_data(1, 32).tensors, ghosts=dynprobe.Ghosts(at=[0]))])
    with pytest.raises(ValueError, match="automatic_optimization=False"):
        trainer.fit(Manual(), torch.utils.data.DataLoader(_data(0), batch_size=16))


def test_step_model_dispatches_forward_and_training_step():
    module = TinyClassifier().eval()
    x = torch.randn(4, 12)
    wrapper = LightningStepModel(module, trainer=pl.Trainer(logger=False, enable_progress_bar=False))
    assert torch.equal(wrapper(x), module(x))
    assert [n for n, _ in wrapper.named_parameters()] == [f"module.{n}" for n, _ in module.named_parameters()]


def test_tensorboard_exporter_writes_into_the_trainers_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(7, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = DynprobeCallback(schedule=[0, 2, 4, 6], exporters=["tensorboard"])
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[callback])
    trainer.fit(TinyClassifier(), torch.utils.data.DataLoader(_data(0), batch_size=16),
                torch.utils.data.DataLoader(_data(1, 64), batch_size=32))
    assert callback.probe.out == tmp_path / "tb" / "version_0" / "dynprobe"  # under trainer.log_dir
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    run = dynprobe.load_run(callback.probe.out)
    c_prev = events.Scalars("dynprobe/C_prev")
    assert [e.step for e in c_prev] == [2, 4, 6]
    np.testing.assert_allclose([e.value for e in c_prev], [run.C[k, k - 1] for k in (1, 2, 3)], rtol=1e-6)
    assert "train_loss" in events.Tags()["scalars"]  # the module's own logging shares the writer
