"""The run directory: its format, the writer, and the read-only :class:`Run` (``load_run``)."""
from .files import RunFormatError
from .run import GhostInfo, Run, load_run

__all__ = ["GhostInfo", "Run", "RunFormatError", "load_run"]
