"""The ``dynprobe`` command line.

Exit codes: 0 success · 1 unexpected error · 2 bad arguments (argparse) · 3 the input is not a readable run
(missing, not a run, damaged, newer format) · 4 the output cannot be written.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ._version import __version__
from .store import RunFormatError

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BAD_RUN, EXIT_UNWRITABLE = 0, 1, 2, 3, 4


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprobe",
        description="Watch how a PyTorch network learns: interval metrics, ghosts, eNTK, phase transition.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad arguments, 3 not a readable run, 4 output not writable.",
    )
    parser.add_argument("--version", action="version", version=f"dynprobe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help="train a small CNN on MNIST-1D with a probe attached (CPU, minutes)",
                               description="Train a 1-D CNN on MNIST-1D (generated offline) with a probe attached, "
                                           "then print the run's summary.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="run directory (default: runs/demo, or runs/demo-2, … if taken)")
    demo.add_argument("--steps", type=_positive_int, default=1500, help="optimizer steps (default: 1500)")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialization and data order (default: 0)")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")

    show = commands.add_parser("show", help="print a run's summary in the terminal",
                               description="Print a run's summary: status, snapshots, losses, C/D extremes.")
    show.add_argument("run", type=Path, help="run directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        if args.command == "demo":
            return _demo(args, console)
        if args.command == "show":
            return _show(args, console)
    except RunFormatError as error:
        errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        return EXIT_BAD_RUN
    except PermissionError as error:
        errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        return EXIT_UNWRITABLE
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


def _demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import DemoConfig, run_demo
    from .report.summary import render_summary
    from .run import load_run

    try:
        out = run_demo(DemoConfig(out=args.out, steps=args.steps, seed=args.seed, threads=args.threads), console)
    except ImportError as error:
        console.print(f"[red]error:[/red] {error}")
        return EXIT_ERROR
    render_summary(load_run(out), console)
    console.print(f"\nRun directory: [bold]{out}[/bold] — load it with dynprobe.load_run({str(out)!r})")
    return EXIT_OK


def _show(args: argparse.Namespace, console: Console) -> int:
    from .report.summary import render_summary
    from .run import load_run

    render_summary(load_run(args.run), console)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
