"""PyTorch Lightning + dynprobe on MNIST-1D: one callback, the same run directory as the plain loop.

The LightningModule below is ordinary Lightning code (its ``training_step`` logs); the only addition is
``DynprobeCallback(...)`` in ``Trainer(callbacks=[...])``. The callback records snapshots with C/D (and S with the
eNTK), trains ghost replicas by replaying ``training_step`` on the captured batches, reads the trainer's
``gradient_clip_val`` and ``accumulate_grad_batches``, writes the run under ``trainer.log_dir/dynprobe`` and its
scalars into the trainer's TensorBoard logger.

Run: ``python examples/lightning_mnist1d.py [--steps 400] [--root runs/lightning-mnist1d]``, then
``dynprobe report <printed run directory>``; ``tensorboard --logdir runs/lightning-mnist1d`` shows the
``dynprobe/*`` curves next to ``train_loss``. Needs ``pip install 'dynprobe[demo,lightning,tensorboard]'``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import dynprobe
from dynprobe.integrations.lightning import DynprobeCallback
from dynprobe.recipes.mnist1d import Conv1dNet, load_mnist1d


class MNIST1DClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Conv1dNet(width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)  # a no-op inside ghosts
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--root", type=Path, default=Path("runs/lightning-mnist1d"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    data = load_mnist1d()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64,
                                        shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=256)
    callback = DynprobeCallback(
        kernel=dynprobe.KernelConfig(n=32),
        ghosts=dynprobe.Ghosts(at=[0, args.steps // 10, args.steps // 4],
                               perturbation=dynprobe.Perturbation(1e-4, "l2"), kernel_every_snapshots=4),
        barriers=dynprobe.Barriers(every_snapshots=4),
        exporters=["tensorboard"],
    )
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, default_root_dir=str(args.root),
                         gradient_clip_val=1.0, check_val_every_n_epoch=1, log_every_n_steps=10,
                         enable_checkpointing=False, callbacks=[callback])
    trainer.fit(MNIST1DClassifier(), train, val)

    run = dynprobe.load_run(callback.probe.out)
    print(f"run: {callback.probe.out}  ({len(run.steps)} snapshots, final eval accuracy "
          f"{run.eval_accuracy[-1]:.3f}, C(final, init) = {run.C[-1, 0]:.3g})")
    for ghost in run.ghosts:
        final = run.chaos["D"][ghost.ghost_id][~torch.isnan(torch.as_tensor(run.chaos["D"][ghost.ghost_id])).numpy()]
        print(f"ghost {ghost.ghost_id} (t0={ghost.spawn_step}{', control' if ghost.control else ''}): final D = "
              f"{final[-1]:.3f}")
    print(f"report: dynprobe report {callback.probe.out}")


if __name__ == "__main__":
    main()
