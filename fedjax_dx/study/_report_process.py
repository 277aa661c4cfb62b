"""The report drawn by a process forked before the study, beside it.

A short study's report costs as much as the study: importing seaborn, pandas and
matplotlib (about 1.5 s) and drawing its figures (about 2.5 s on a 2-core machine).
`ReportProcess.start()` forks a child before the study starts any thread or JAX backend;
the child imports the plotting libraries while the study runs (on the core the study
leaves idle), then waits. `draw(workdir)` has it draw the report (`_report.make_report`,
which forks once more to draw two figures at a time) and returns the paths. Told that
metrics.jsonl is written (`metrics_written`), it draws the figures that read only that
while the study writes its summaries; the figures that read those are drawn by whichever
drawing process is free first once `draw` has opened the gate (a pipe every drawing
process reads one byte of: every result written, or the study failed). The report is the one the study's own process
would draw: the same code on the same files.

Where the child cannot be started (not Linux, a thread or a JAX backend already running,
as in a notebook) `start` returns None, and where it fails `draw` returns None: the
caller then draws the report itself, which raises the error where there is one.
"""

from __future__ import annotations

import os
import pickle


class ReportProcess:
  """A forked child that draws a study's report when told which workdir.

  Example:
    >>> reporter = ReportProcess.start()  # before the study
    >>> paths = run_study(config, workdir)
    >>> figures = reporter.draw(workdir) if reporter else None
    >>> figures = figures or make_report(workdir)
  """

  def __init__(self, pid: int, commands: int, results: int, gate: int):
    self._pid = pid  # the child's process id (None once it has ended)
    self._commands = commands  # write end: the workdir's line, _STOP (or None)
    self._results = results  # read end: the pickled paths, or nothing (or None)
    self._gate = gate  # write end: _GATE_BYTES of _WRITTEN or _FAILED (or None)
    self._told = False  # whether the workdir was sent

  @classmethod
  def start(cls) -> "ReportProcess | None":
    """Forks the child (None where this process cannot fork safely: `can_fork`)."""
    from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
    if not _report.can_fork():
      return None
    command_out, command_in = os.pipe()
    result_out, result_in = os.pipe()
    gate_out, gate_in = os.pipe()
    _report.flush_before_fork()
    pid = os.fork()
    if pid == 0:  # the child: never returns
      try:
        os.close(command_in)
        os.close(result_out)
        os.close(gate_in)
        _serve(command_out, result_in, gate_out)
      finally:
        os._exit(0)  # pylint: disable=protected-access
    os.close(command_out)
    os.close(result_in)
    os.close(gate_out)
    return cls(pid, command_in, result_out, gate_in)

  def metrics_written(self, workdir: str) -> None:
    """Tells the child that `workdir`'s metrics.jsonl and predictions.jsonl are
    written: it draws the figures that read only those (and partition.json) while
    the study writes its summaries (`run_study`'s `on_metrics_written`)."""
    if self._pid is None or self._told:
      return
    self._told = True
    try:
      os.write(self._commands, os.fsencode(os.path.abspath(workdir)) + b"\n")
    except OSError:  # the child is gone: `draw` returns None
      pass

  def draw(self, workdir: str) -> dict[str, str] | None:
    """The report of `workdir` (every result written) drawn by the child:
    `make_report`'s {name: path}, or None where the child could not draw it (its
    error is not raised here)."""
    if self._pid is None:
      return None
    try:
      self.metrics_written(workdir)
      self._open_gate(_WRITTEN)
      self._commands = _close(self._commands)  # (stop sends nothing more)
      chunks = []
      while chunk := os.read(self._results, 65536):
        chunks.append(chunk)
    finally:
      self.stop()
    try:
      return pickle.loads(b"".join(chunks)) if chunks else None
    except (pickle.UnpicklingError, EOFError, ValueError):
      return None

  def _open_gate(self, answer: bytes) -> None:
    """Gives every drawing process its answer (`_WRITTEN` or `_FAILED`) and closes
    the gate (not end of file alone: a process forked since holds the pipe too)."""
    if self._gate is not None:
      try:
        os.write(self._gate, answer * _GATE_BYTES)
      except OSError:
        pass
    self._gate = _close(self._gate)

  def stop(self) -> None:
    """Ends the child (without a report when `draw` was not called: `_STOP`, and
    `_FAILED` for the figures that wait for the summaries) and waits for it."""
    self._open_gate(_FAILED)
    if self._commands is not None:
      try:  # not end of file alone: a process forked since holds the pipe too
        os.write(self._commands, (b"" if self._told else b"\n") + _STOP)
      except OSError:
        pass
    self._commands = _close(self._commands)
    self._results = _close(self._results)
    if self._pid is not None:
      try:
        os.waitpid(self._pid, 0)
      except ChildProcessError:
        pass
      self._pid = None


def _close(descriptor: int | None) -> None:
  """Closes `descriptor` (if not None and still open); returns None."""
  if descriptor is not None:
    try:
      os.close(descriptor)
    except OSError:
      pass
  return None


# The child's commands: the workdir's line (metrics.jsonl written), or _STOP before it
# (no report). End of file (the study's process ended) is a stop too.
_STOP = b"stop\n"
# The gate's bytes, one for each drawing process (at most 2, `_report._draw`): every
# result file is written (draw the rest), or the study failed (draw nothing more).
# End of file (the study's process ended) is a failure too.
_WRITTEN = b"w"
_FAILED = b"f"
_GATE_BYTES = 16


def _serve(commands: int, results: int, gate: int) -> None:
  """The child: imports the plotting libraries; reads the workdir's line (metrics
  written), draws what needs only those, reads `_WRITTEN` from the gate (every
  result written; each drawing process reads its own byte) while drawing the rest,
  and writes the pickled paths to `results` (nothing on failure, or on `_STOP`,
  `_FAILED` or end of file instead: the study failed)."""
  from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
  try:
    _report.prepare()
  except Exception:  # pylint: disable=broad-except
    return  # the study's process draws the report and raises the error
  lines = _Lines(commands)
  workdir = lines.next()
  if not workdir:  # stopped
    return

  def results_written() -> bool:  # called in each drawing process (they fork)
    return os.read(gate, 1) == _WRITTEN

  try:
    paths = _report.make_report(os.fsdecode(workdir), results_written=results_written)
  except Exception:  # pylint: disable=broad-except
    return
  with os.fdopen(results, "wb") as out:
    out.write(pickle.dumps(paths))


class _Lines:
  """The lines read from a pipe, one at a time (b"" at end of file)."""

  def __init__(self, descriptor: int):
    self._descriptor, self._buffer = descriptor, b""

  def next(self) -> bytes:
    while b"\n" not in self._buffer:
      chunk = os.read(self._descriptor, 65536)
      if not chunk:
        return b""
      self._buffer += chunk
    line, _, self._buffer = self._buffer.partition(b"\n")
    return line
