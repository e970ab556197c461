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

from dynprobe._version import __version__
from dynprobe.store.files import RunFormatError

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

    demo = commands.add_parser("demo", help="the chaos and cone effects on MNIST-1D in about two minutes (CPU)",
                               description="Train a 1-D CNN with BatchNorm on MNIST-1D (generated offline) with a "
                                           "probe attached — ghosts spawned at log-spaced steps plus an ε=0 "
                                           "control, the eNTK on a probe subset, loss barriers — then print the "
                                           "summary and write RUN/report.html.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="run directory (default: runs/demo, or runs/demo-2, … if taken)")
    demo.add_argument("--steps", type=_positive_int, default=1500, help="optimizer steps (default: 1500)")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialization and data order (default: 0)")
    demo.add_argument("--ghosts", type=int, default=5,
                      help="perturbed ghosts, spawned log-spaced from step 0 (default: 5; 0 turns ghosts off)")
    demo.add_argument("--kernel-n", type=int, default=96,
                      help="eNTK probe-set size (default: 96; 0 turns the eNTK off)")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.add_argument("--open", action="store_true", help="open the HTML report in a web browser")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")

    show = commands.add_parser("show", help="print a run's summary in the terminal",
                               description="Print a run's summary: status, snapshots, losses, C/D extremes, the "
                                           "phase-transition estimates and the cone numbers.")
    show.add_argument("run", type=Path, help="run directory")

    report = commands.add_parser("report", help="write a self-contained HTML report of a run",
                                 description="Write one self-contained HTML file (figures embedded, no network "
                                             "needed) with the paper's figures for a run, and print its summary.")
    report.add_argument("run", type=Path, help="run directory")
    report.add_argument("-o", "--output", type=Path, default=None,
                        help="output file (default: RUN/report.html)")
    report.add_argument("--open", action="store_true", help="open the report in a web browser")
    report.add_argument("--log-steps", action="store_true", help="log-scale step axes (default: linear)")

    compare = commands.add_parser("compare", help="write a side-by-side HTML report of two runs",
                                  description="Write one HTML file comparing two runs side by side (e.g. two "
                                              "architectures or learning rates), and print a comparison table.")
    compare.add_argument("run_a", type=Path, help="first run directory")
    compare.add_argument("run_b", type=Path, help="second run directory")
    compare.add_argument("-o", "--output", type=Path, default=None,
                         help="output file (default: compare-A-vs-B.html in the current directory)")
    compare.add_argument("--open", action="store_true", help="open the report in a web browser")
    compare.add_argument("--log-steps", action="store_true", help="log-scale step axes (default: linear)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        if args.command == "demo":
            return _demo(args, console, errors)
        if args.command == "show":
            return _show(args, console)
        if args.command == "report":
            return _report(args, console, errors)
        if args.command == "compare":
            return _compare(args, console, errors)
    except RunFormatError as error:
        errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        return EXIT_BAD_RUN
    except PermissionError as error:
        errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        return EXIT_UNWRITABLE
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


def _demo(args: argparse.Namespace, console: Console, errors: Console) -> int:
    import time

    from dynprobe.analysis.run_analysis import analyze
    from dynprobe.demo import DemoConfig, run_demo
    from dynprobe.report.html import build_report
    from dynprobe.report.summary import render_summary
    from dynprobe.store.run import load_run

    started = time.perf_counter()
    config = DemoConfig(out=args.out, steps=args.steps, seed=args.seed, ghosts=args.ghosts, kernel_n=args.kernel_n,
                        threads=args.threads)
    try:
        out = run_demo(config, console)
    except ImportError as error:
        errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        return EXIT_ERROR
    run = load_run(out)
    result = analyze(run)
    render_summary(run, console, result)
    if not args.no_report:
        _write_report(lambda tick: build_report(run, tick=tick, result=result), run.path / "report.html", args,
                      console, errors, steps=17)
    console.print(f"\nRun directory: [bold]{out}[/bold] — load it with dynprobe.load_run({str(out)!r}); "
                  f"demo finished in {time.perf_counter() - started:.0f} s", highlight=False)
    return EXIT_OK


def _show(args: argparse.Namespace, console: Console) -> int:
    from dynprobe.report.summary import render_summary
    from dynprobe.store.run import load_run

    render_summary(load_run(args.run), console)
    return EXIT_OK


class _LazyProgress:
    """A rich progress bar on stderr that appears only once the work has taken more than ``delay`` seconds."""

    def __init__(self, errors: Console, total: int, delay: float = 1.0) -> None:
        import time

        self._clock, self._started = time.perf_counter, time.perf_counter()
        self.errors, self.total, self.delay = errors, total, delay
        self.progress = None
        self.task = None
        self.done = 0

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.progress is None and self._clock() - self._started > self.delay:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("report: {task.description:<20}"), BarColumn(), TimeElapsedColumn(),
                                     console=self.errors, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(label, total=self.total)
        if self.progress is not None:
            self.progress.update(self.task, completed=min(self.done, self.total), description=label)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _write_report(build, output: Path, args: argparse.Namespace, console: Console, errors: Console,
                  steps: int) -> int:
    from dynprobe.report.html import check_writable, write_html

    check_writable(output)
    progress = _LazyProgress(errors, total=steps)
    try:
        text = build(progress)
    finally:
        progress.close()
    path = write_html(output, text)
    console.print(f"Report written to [bold]{path}[/bold] ({len(text) / 1e6:.1f} MB)", highlight=False)
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def _report(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from dynprobe.analysis.run_analysis import analyze
    from dynprobe.report.html import build_report
    from dynprobe.report.summary import render_summary
    from dynprobe.store.run import load_run

    run = load_run(args.run)
    result = analyze(run)  # validates the run's arrays before anything is written
    render_summary(run, console, result)
    output = args.output if args.output is not None else run.path / "report.html"
    return _write_report(lambda tick: build_report(run, log_steps=args.log_steps, tick=tick, result=result), output,
                         args, console, errors, steps=17)


def _compare(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from dynprobe.analysis.run_analysis import analyze
    from dynprobe.report.html import build_comparison
    from dynprobe.report.summary import comparison_table
    from dynprobe.store.run import load_run

    runs = [load_run(args.run_a), load_run(args.run_b)]
    console.print(comparison_table(runs, [analyze(run) for run in runs]))
    output = args.output if args.output is not None else Path(f"compare-{runs[0].name}-vs-{runs[1].name}.html")
    return _write_report(lambda tick: build_comparison(*runs, log_steps=args.log_steps, tick=tick), output, args,
                         console, errors, steps=30)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
