"""The report drawn by a process forked before the study, beside it.

A short study's report costs as much as the study: importing seaborn, pandas and
matplotlib (about 1.5 s) and drawing its figures (about 2.5 s on a 2-core machine).
`ReportProcess.start()` forks a child before the study starts any thread or JAX backend;
the child imports the plotting libraries while the study runs (on the core the study
leaves idle), then waits. `draw(workdir)` has it draw the report (`_report.make_report`,
which forks once more to draw two figures at a time) and returns the paths. The report
is the one the study's own process would draw: the same code on the same files.

Where the child cannot be started (not Linux, a thread or a JAX backend already running,
as in a notebook) `start` returns None, and where it fails `draw` returns None: the
caller then draws the report itself, which raises the error where there is one.
"""

from __future__ import annotations

import os
import pickle
import sys


class ReportProcess:
  """A forked child that draws a study's report when told which workdir.

  Example:
    >>> reporter = ReportProcess.start()  # before the study
    >>> paths = run_study(config, workdir)
    >>> figures = reporter.draw(workdir) if reporter else None
    >>> figures = figures or make_report(workdir)
  """

  def __init__(self, pid: int, commands: int, results: int):
    self._pid = pid  # the child's process id (None once it has ended)
    self._commands = commands  # write end: the workdir, then end of file (or None)
    self._results = results  # read end: the pickled paths, or nothing (or None)

  @classmethod
  def start(cls) -> "ReportProcess | None":
    """Forks the child (None where this process cannot fork safely: `can_fork`)."""
    from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
    if not _report.can_fork():
      return None
    command_out, command_in = os.pipe()
    result_out, result_in = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # nothing buffered twice
      stream.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
      try:
        os.close(command_in)
        os.close(result_out)
        _serve(command_out, result_in)
      finally:
        os._exit(0)  # pylint: disable=protected-access
    os.close(command_out)
    os.close(result_in)
    return cls(pid, command_in, result_out)

  def draw(self, workdir: str) -> dict[str, str] | None:
    """The report of `workdir` drawn by the child: `make_report`'s {name: path}, or
    None where the child could not draw it (its error is not raised here)."""
    if self._pid is None:
      return None
    try:
      try:
        os.write(self._commands, os.fsencode(os.path.abspath(workdir)))
      except OSError:  # the child is gone
        pass
      self._commands = _close(self._commands)
      chunks = []
      while chunk := os.read(self._results, 65536):
        chunks.append(chunk)
    finally:
      self.stop()
    try:
      return pickle.loads(b"".join(chunks)) if chunks else None
    except (pickle.UnpicklingError, EOFError, ValueError):
      return None

  def stop(self) -> None:
    """Ends the child (without a report when `draw` was not called: end of file on
    its commands) and waits for it."""
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


def _serve(commands: int, results: int) -> None:
  """The child: imports the plotting libraries, reads the workdir (until end of file),
  draws its report and writes the pickled paths to `results` (nothing on failure)."""
  from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
  try:
    _report.prepare()
  except Exception:  # pylint: disable=broad-except
    return  # the study's process draws the report and raises the error
  chunks = []
  while chunk := os.read(commands, 65536):
    chunks.append(chunk)
  if not chunks:  # stopped
    return
  try:
    payload = pickle.dumps(_report.make_report(os.fsdecode(b"".join(chunks))))
  except Exception:  # pylint: disable=broad-except
    return
  with os.fdopen(results, "wb") as out:
    out.write(payload)
