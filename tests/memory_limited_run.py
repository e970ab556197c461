"""A probed training run inside an address-space limit (``RLIMIT_AS``): run as a child process by
``tests/store/test_history_memory.py``, or by hand::

    python tests/memory_limited_run.py OUT --limit-mib 320 [--history-memory BYTES]

After the imports and the model are in place the process limits itself to what it maps now plus ``--limit-mib``
MiB, then trains a 1 M-parameter MLP for 40 steps with a snapshot at every step (60 parameter vectors of 4 MiB
would need 240 MiB of history). It prints one JSON line: the snapshots committed, the limit, and its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import torch
from torch import nn

import dynprobe

STEPS = 40


def address_space() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--limit-mib", type=int, default=320)
    parser.add_argument("--history-memory", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 2048), nn.Tanh(), nn.Linear(2048, 384), nn.Tanh(), nn.Linear(384, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(512, 128), torch.randint(0, 10, (512,))
    eval_data = (torch.randn(128, 128), torch.randint(0, 10, (128,)))
    limit = address_space() + args.limit_mib * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    probe = dynprobe.Probe(model, optimizer, eval_data=eval_data, out=args.out, schedule=1, errors="raise",
                           history_memory=args.history_memory)
    criterion = probe.watch(nn.CrossEntropyLoss())
    for _ in range(STEPS):
        batch = torch.randint(0, 512, (64,))
        optimizer.zero_grad()
        criterion(model(x[batch]), y[batch]).backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(args.out)
    print(json.dumps({"snapshots": len(run), "status": run.status, "limit_bytes": limit,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
