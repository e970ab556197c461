"""The ``dynprobe`` command line.

Exit codes: 0 success · 1 unexpected error · 2 bad arguments (argparse) · 3 the input is not a readable run
(missing, not a run, damaged, newer format) · 4 the output cannot be written.

Outputs are checked before any work (``report -o /unwritable`` exits 4 before printing anything); tables use the
full width when the output is not a terminal, or come as JSON with ``--format json``. Every string from a run or
the command line is printed through :mod:`dynprobe.report.terminal` (never parsed as markup, control characters
made visible).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from dynprobe._version import __version__
from dynprobe.analysis.run_analysis import analyze
from dynprobe.demo import DEMO_DURATION, DEMO_SPAWNS, DemoConfig, run_demo
from dynprobe.report.compare import build_comparison
from dynprobe.report.html import build_report, check_writable, write_html
from dynprobe.report.summary import comparison_table, display_names, render_summary, spread, summary_data
from dynprobe.report.terminal import safe_text
from dynprobe.store.files import RunFormatError, RunFormatWarning
from dynprobe.store.run import load_run

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BAD_RUN, EXIT_UNWRITABLE = 0, 1, 2, 3, 4
PIPED_WIDTH = 1000  # columns when stdout is not a terminal: tables are never cut or wrapped to 80


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _add_output_options(command: argparse.ArgumentParser, *, html: bool = True) -> None:
    command.add_argument("--format", choices=("table", "json"), default="table",
                         help="terminal output: rich tables (default) or JSON for scripts")
    if html:
        command.add_argument("--open", action="store_true", help="open the report in a web browser")
        command.add_argument("--log-steps", action="store_true", help="log-scale step axes (default: linear)")
        command.add_argument("--log-y", action="store_true",
                             help="log-scale loss axes (default: automatic when the losses span > 100×)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprobe",
        description="Watch how a PyTorch network learns: interval metrics, ghosts, eNTK, phase transition.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad arguments, 3 not a readable run, 4 output not writable.",
    )
    parser.add_argument("--version", action="version", version=f"dynprobe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help=f"the chaos and cone effects on MNIST-1D ({DEMO_DURATION})",
                               description="Train an MLP on MNIST-1D (generated offline) at a constant learning "
                                           "rate with a probe attached — ghosts in three directions per spawn "
                                           "step plus an ε=0 control, the eNTK on a probe subset, loss barriers — "
                                           "then print the summary and write RUN/report.html.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="run directory (default: runs/demo, or runs/demo-2, … if taken)")
    defaults = DemoConfig()
    demo.add_argument("--steps", type=_positive_int, default=defaults.steps,
                      help=f"optimizer steps (default: {defaults.steps})")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialization and data order (default: 0)")
    demo.add_argument("--ghosts", type=int, default=defaults.ghosts,
                      help=f"ghost spawn steps, taken in this order: {', '.join(map(str, DEMO_SPAWNS))} "
                           f"(default: {defaults.ghosts}; 0 turns ghosts off)")
    demo.add_argument("--directions", type=_positive_int, default=defaults.directions,
                      help=f"perturbation directions per spawn step (default: {defaults.directions})")
    demo.add_argument("--kernel-n", type=int, default=96,
                      help="eNTK probe-set size (default: 96; 0 turns the eNTK off)")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.add_argument("--open", action="store_true", help="open the HTML report in a web browser")
    demo.add_argument("--threads", type=_positive_int, default=defaults.threads,
                      help=f"torch CPU threads (default: {defaults.threads}, the same run on every machine)")

    show = commands.add_parser("show", help="print a run's summary in the terminal",
                               description="Print a run's summary: the transition (or why it is undetermined), "
                                           "status, snapshots, losses, the estimates with their evidence, each "
                                           "ghost's plateau level and verdict, and the cone numbers.")
    show.add_argument("run", type=Path, help="run directory")
    _add_output_options(show, html=False)

    report = commands.add_parser("report", help="write a self-contained HTML report of a run",
                                 description="Write one self-contained HTML file (figures embedded, no network "
                                             "needed) with the paper's figures for a run, and print its summary.")
    report.add_argument("run", type=Path, help="run directory")
    report.add_argument("-o", "--output", type=Path, default=None, help="output file (default: RUN/report.html)")
    report.add_argument("--include-command", action="store_true",
                        help="show the command line the run recorded (Probe(record_command=True); secrets redacted)")
    _add_output_options(report)

    compare = commands.add_parser("compare", help="compare runs (seeds or settings) in one HTML report",
                                  description="Write one HTML file comparing two or more runs (seeds, learning "
                                              "rates, architectures): curves overlaid, the spread of the transition "
                                              "estimates across runs, and a table; print the table.")
    compare.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories (two or more)")
    compare.add_argument("-o", "--output", type=Path, default=None,
                         help="output file (default: compare-A-vs-B….html next to the first run)")
    _add_output_options(compare)
    return parser


def _consoles() -> tuple[Console, Console]:
    """stdout and stderr consoles: full width (no wrapping, no cut tables) when the stream is not a terminal."""
    out_width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", PIPED_WIDTH))
    err_width = None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", PIPED_WIDTH))
    return Console(width=out_width), Console(stderr=True, soft_wrap=True, width=err_width)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare" and len(args.runs) < 2:
        parser.error("compare needs at least two run directories")
    console, errors = _consoles()
    commands = {"demo": _demo, "show": _show, "report": _report, "compare": _compare}
    if args.command not in commands:  # pragma: no cover - argparse rejects it first
        parser.error(f"unknown command {args.command!r}")
    with warnings.catch_warnings(record=True) as caught:
        if args.command != "demo":  # the demo's training warnings go to the user as they happen
            warnings.simplefilter("always", RunFormatWarning)
        try:
            code = commands[args.command](args, console, errors)
        except RunFormatError as error:
            _error(errors, error)
            code = EXIT_BAD_RUN
        except PermissionError as error:
            _error(errors, error)
            code = EXIT_UNWRITABLE
    for warning in caught:
        if issubclass(warning.category, RunFormatWarning):
            _error(errors, warning.message, label="warning:", style="yellow")
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return code


def _error(errors: Console, error: object, label: str = "error:", style: str = "red") -> None:
    errors.print(Text.assemble((label, style), " ", safe_text(error)), highlight=False)


def _demo(args: argparse.Namespace, console: Console, errors: Console) -> int:
    started = time.perf_counter()
    config = DemoConfig(out=args.out, steps=args.steps, seed=args.seed, ghosts=args.ghosts,
                        directions=args.directions, kernel_n=args.kernel_n, threads=args.threads)
    try:
        out = run_demo(config, console)
    except ImportError as error:
        _error(errors, error)
        return EXIT_ERROR
    run = load_run(out)
    result = analyze(run)
    render_summary(run, console, result)
    if not args.no_report:
        _write_report(lambda tick: build_report(run, tick=tick, result=result), run.path / "report.html", args,
                      console, errors, steps=20)
    elapsed = time.perf_counter() - started
    console.print(Text.assemble("\nRun directory: ", safe_text(out, "bold"), " — load it with dynprobe.load_run(",
                                safe_text(repr(str(out))), f"); demo finished in {elapsed:.0f} s"), highlight=False)
    return EXIT_OK


def _print_json(console: Console, data: object) -> None:
    console.file.write(json.dumps(data, ensure_ascii=False, indent=2, allow_nan=False) + "\n")
    console.file.flush()


def _show(args: argparse.Namespace, console: Console, errors: Console) -> int:
    run = load_run(args.run)
    if args.format == "json":
        _print_json(console, summary_data(run))
    else:
        render_summary(run, console)
    return EXIT_OK


class _LazyProgress:
    """A rich progress bar on stderr that appears only once the work has taken more than ``delay`` seconds."""

    def __init__(self, errors: Console, total: int, delay: float = 1.0) -> None:
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

    check_writable(output)
    progress = _LazyProgress(errors, total=steps)
    try:
        text = build(progress)
    finally:
        progress.close()
    path = write_html(output, text)
    message = Text.assemble("Report written to ", safe_text(path, "bold"), f" ({len(text) / 1e6:.1f} MB)")
    (errors if getattr(args, "format", "table") == "json" else console).print(message, highlight=False)
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def _report(args: argparse.Namespace, console: Console, errors: Console) -> int:
    run = load_run(args.run)
    output = args.output if args.output is not None else run.path / "report.html"
    check_writable(output)  # before any analysis or printing: an unwritable output fails fast (exit 4)
    result = analyze(run)  # validates the run's arrays before anything is written
    if args.format == "json":
        _print_json(console, summary_data(run, result))
    else:
        render_summary(run, console, result)
    return _write_report(lambda tick: build_report(run, log_steps=args.log_steps, log_y=args.log_y or None,
                                                   tick=tick, result=result, include_command=args.include_command),
                         output, args, console, errors, steps=20)


def default_comparison_path(run_paths: Sequence[Path], names: Sequence[str]) -> Path:
    """``compare-A-vs-B….html`` next to the first run (in its parent directory); shortened past four runs."""
    stem = "-vs-".join(names) if len(names) <= 4 else f"{names[0]}-and-{len(names) - 1}-more"
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in stem)[:150]
    return Path(run_paths[0]).resolve().parent / f"compare-{safe}.html"


def _compare(args: argparse.Namespace, console: Console, errors: Console) -> int:
    runs = [load_run(path) for path in args.runs]
    output = args.output if args.output is not None else default_comparison_path(args.runs, display_names(runs))
    check_writable(output)
    results = [analyze(run) for run in runs]
    if args.format == "json":
        _print_json(console, {"runs": [summary_data(run, result) for run, result in zip(runs, results)],
                              "spread": spread(results)})
    else:
        console.print(comparison_table(runs, results))
    return _write_report(lambda tick: build_comparison(runs, results=results, log_steps=args.log_steps,
                                                       log_y=args.log_y or None, tick=tick),
                         output, args, console, errors, steps=8 + 2 * len(runs))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
