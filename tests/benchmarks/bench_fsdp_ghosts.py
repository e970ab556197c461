"""Ghosts under FSDP2 at a real size: a small Transformer language model (token and position embeddings and the
final norm owned by the root FSDP module, every block ``fully_shard``-ed), AdamW, dropout, 2 gloo ranks on the CPU.

Per plain training step (no snapshot, no spawn) the probe with ``--ghosts`` perturbed ghosts and the ε = 0 control
costs ≈ (1 + ghosts + 1) × the bare step: each ghost replays the step through the model's FSDP modules. Printed:
the bare step, the probed plain step, their ratio and the cost per ghost in bare steps; the control's L2 to the
main run at the last snapshot (0 means bit for bit); whether the main run's shards are bit for bit those of the
same loop without the probe.

    python tests/benchmarks/bench_fsdp_ghosts.py [--width 256] [--layers 4] [--steps 10] [--ghosts 2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

import dynprobe

VOCAB, SEQUENCE, BATCH = 1000, 64, 8  # per rank


class LanguageModel(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, width), nn.Embedding(SEQUENCE, width)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.norm(h) @ self.tokens.weight.T  # tied output layer


def sharded_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    model = LanguageModel(width, layers)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQUENCE + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def loop(rank: int, width: int, layers: int, steps: int, probe_options: dict | None, out: Path
         ) -> tuple[list[float], nn.Module, dynprobe.Probe | None]:
    torch.manual_seed(10 + rank)
    model = sharded_model(width, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    criterion, probe = lm_loss, None
    if probe_options is not None:
        generator = torch.Generator().manual_seed(99)
        eval_tokens = torch.randint(0, VOCAB, (16, SEQUENCE + 1), generator=generator)
        probe = dynprobe.Probe(model, optimizer, eval_data=(eval_tokens[:, :-1], eval_tokens[:, 1:]), out=out,
                               progress=False, task="tokens", **probe_options)
        criterion = probe.watch(lm_loss)
    times = []
    for step in range(steps):
        x, y = batch(step, rank)
        start = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times, model, probe


def worker(rank: int, world: int, port: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    bare_times, bare, _ = loop(rank, args.width, args.layers, args.steps, None, Path(folder))
    last = args.steps
    options = dict(schedule=dynprobe.schedule.at([0, last]), total_steps=last,
                   ghosts=dynprobe.Ghosts(at=[1], directions=args.ghosts))
    probed_times, model, probe = loop(rank, args.width, args.layers, args.steps, options, Path(folder) / "run")
    plain = [t for step, t in enumerate(probed_times, start=1) if step not in (1, last)][1:]
    unchanged = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), bare.parameters()))
    assert probe is not None
    probe.close()
    if rank == 0:
        parameters = sum(p.numel() for p in model.parameters())
        (Path(folder) / "result.json").write_text(json.dumps({
            "parameters": parameters, "bare_step_s": statistics.median(bare_times[2:]),
            "probed_plain_step_s": statistics.median(plain), "unchanged": unchanged}))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ghosts", type=int, default=2, help="perturbed ghosts (the ε = 0 control comes on top)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(2, free_port(), args, folder), nprocs=2, start_method="spawn")
        result = json.loads((Path(folder) / "result.json").read_text())
        run = dynprobe.load_run(Path(folder) / "run")
        control = [e for e in run.events if e.get("event") == "ghost_compare" and e["ghost"] == 0]
        ratio = result["probed_plain_step_s"] / result["bare_step_s"]
        print(f"Transformer LM, width {args.width}, {args.layers} blocks ({result['parameters']:,} parameters), "
              f"fully_shard on 2 gloo ranks (1 thread each), AdamW, batch {BATCH}×{SEQUENCE} per rank")
        print(f"bare step {result['bare_step_s'] * 1e3:.0f} ms; with {args.ghosts} ghosts + control "
              f"{result['probed_plain_step_s'] * 1e3:.0f} ms: {ratio:.2f}× "
              f"({(ratio - 1) / (args.ghosts + 1):.2f} bare steps per ghost)")
        print(f"control L2 at the last snapshot: {control[-1]['L2'] if control else 'n/a'}; main run unchanged bit "
              f"for bit: {result['unchanged']}")


if __name__ == "__main__":
    main()
