"""The run directory: its format (:mod:`.layout`), the writer (:class:`RunWriter`, a :class:`RunSink`), and the
read-only :class:`Run` (``load_run``)."""
from .disk import DiskUsage, projected_run_bytes
from .files import RunFormatError, RunFormatWarning
from .lock import RunInUseError
from .run import GhostInfo, Run, load_run
from .runs import load_runs
from .sink import RunSink
from .writer import RunWriter

__all__ = ["DiskUsage", "GhostInfo", "Run", "RunFormatError", "RunFormatWarning", "RunInUseError", "RunSink",
           "RunWriter", "load_run", "load_runs", "projected_run_bytes"]
