"""The two-phase paper's CIFAR-10 experiment (ResNet-20 or VGG-16-BN) with dynprobe attached — for a GPU.

Trains with the paper's recipe (SGD momentum 0.9, weight decay 1e-4, lr 0.1 ÷10 at epochs 80 and 120, batch 128,
random crop + flip; :mod:`dynprobe.recipes.cifar10`), with ghosts spawned around the architecture's transition
(ResNet-20: 0…5000, VGG-16: 0…7500), the eNTK on 128 test images, and then writes ``RUN/report.html``.

Needs torchvision (`pip install -e ".[cifar]"`). Examples::

    # the paper's first 10^4 iterations on a GPU (CIFAR-10 already in ./data, or add --download)
    python examples/cifar10_paper.py --model resnet20 --data ./data --max-iterations 10000
    python examples/cifar10_paper.py --model vgg16_bn --data ./data --max-iterations 10000
    # a smoke test without the dataset (torchvision FakeData, CPU, a minute)
    python examples/cifar10_paper.py --fake-size 512 --max-iterations 20 --kernel-n 16 --device cpu

Determinism: the recipe calls ``make_deterministic(seed)`` before CUDA initializes; a 1e-7 perturbation is at the
level of the GPU's own nondeterminism otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import dynprobe
from dynprobe.recipes.cifar10 import PaperRecipe
from dynprobe.report.html import build_report, write_html


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet20", "vgg16_bn"), default="resnet20")
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 root (torchvision layout)")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 into --data")
    parser.add_argument("--fake-size", type=int, default=None,
                        help="use torchvision FakeData of this size instead of CIFAR-10 (smoke tests)")
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--max-iterations", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--kernel-n", type=int, default=128, help="eNTK probe-set size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/cifar10-MODEL)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.data is None and args.fake_size is None:
        raise SystemExit("give --data DIR (CIFAR-10, add --download to fetch it) or --fake-size N for a smoke test")
    recipe = PaperRecipe(model=args.model, out=args.out or Path(f"runs/cifar10-{args.model}"), data=args.data,
                         download=args.download, fake_size=args.fake_size, epochs=args.epochs,
                         max_iterations=args.max_iterations, seed=args.seed, device=args.device,
                         num_workers=args.num_workers, kernel_n=args.kernel_n)
    out = recipe.run()
    run = dynprobe.load_run(out)
    transition = dynprobe.analysis.estimate_transition(run)
    print(f"{out}: {len(run.steps)} snapshots, {len(run.ghosts)} ghosts; {transition.summary}")
    if not args.no_report:
        print(f"report: {write_html(out / 'report.html', build_report(run))}")
    return out


if __name__ == "__main__":
    main()
