"""FSDP2 (``fully_shard``) + dynprobe on MNIST-1D: the same two lines on every rank, launched with torchrun.

Each rank shards the demo's MLP (every Linear, then the whole model: its parameters become DTensors, each rank
holding a slice of every weight), trains on its half of each global batch, and builds the probe with the same
arguments — ghosts included: sharded replicas perturbed by ε at step 0 and a quarter of the way, trained in
lock-step through the same FSDP modules; rank 0 writes the run directory, every rank writes its own parameter
shards into it. The run reads back
on one process like any other (``dynprobe.load_run``: whole θ vectors, C, D, eval accuracy).

Run (CPU, gloo; on GPUs the same command, the backend becomes NCCL)::

    torchrun --standalone --nproc-per-node 2 examples/fsdp_mnist1d.py --steps 200 --out runs/fsdp-mnist1d

then ``dynprobe show runs/fsdp-mnist1d``. Needs ``pip install 'dynprobe[demo]'`` (MNIST-1D is generated offline).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import dynprobe
from dynprobe.recipes.mnist1d import MLP, epoch_batches, load_mnist1d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp-mnist1d"))
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")

    data = load_mnist1d(num_samples=2000)
    torch.manual_seed(args.seed)  # the same initialization on every rank
    model = MLP(width=128).to(device)
    for layer in model.net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    probe = dynprobe.Probe(model, optimizer, eval_data=(data.x_test, data.y_test), out=args.out,   # every rank
                           total_steps=args.steps, progress=rank == 0,
                           ghosts=dynprobe.Ghosts(at=[0, args.steps // 4]))  # sharded replicas, perturbed by ε
    criterion = probe.watch(criterion)

    per_rank = args.batch_size // world
    n = data.x_train.shape[0]
    batches_per_epoch = n // args.batch_size
    for step in range(args.steps):
        epoch, index = divmod(step, batches_per_epoch)
        batch = epoch_batches(n, args.batch_size, args.seed, epoch)[index]
        mine = batch[rank * per_rank:(rank + 1) * per_rank]  # this rank's half of the global batch
        loss = criterion(model(data.x_train[mine].to(device)), data.y_train[mine].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()

    if rank == 0:
        run = dynprobe.load_run(args.out)
        print(f"run: {args.out}  ({len(run.steps)} snapshots, {run.num_parameters} parameters over {world} ranks; "
              f"final eval accuracy {run.eval_accuracy[-1]:.3f}, C(final, init) = {run.C[-1, 0]:.3g})")
        for ghost, l2 in zip(run.ghosts, run.chaos["L2"][:, -1]):  # the chaos effect: where ε took each ghost
            print(f"ghost {ghost.ghost_id} (spawned at step {ghost.spawn_step}{', ε = 0' if ghost.control else ''}): "
                  f"L2 to the main run at the end {l2:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
