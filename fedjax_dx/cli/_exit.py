"""Ending a command's process quickly."""

import atexit
import gc
import os
import sys
import threading


def run_app(main, **kwargs) -> None:
  """`absl.app.run(main, **kwargs)`, ended like `sys.exit` (the other threads joined,
  exit handlers run, output flushed, the same exit status and message) but without
  the interpreter's teardown of every module and compiled program one by one, about
  0.5 s of a short study's few seconds. An exception other than `SystemExit` ends
  the process as usual."""
  from absl import app  # pylint: disable=g-import-not-at-top
  # The modules imported so far (jax, fedjax_dx: most of the objects a study keeps)
  # live until the process ends: frozen, Python's cycle collector stops rescanning
  # them at every full collection (0.3 s of a warm default study, 1 s of a cold one).
  # Tracing makes hundreds of thousands of objects, most of them kept (programs,
  # data): collected every 10,000 allocations instead of 700, and fully every 1M
  # instead of 70,000 (with the freeze in `_run.main`: a cold flamby_tcga study 18.7 ->
  # 17.9 CPU-s, 12.0 -> 11.5 s, medians of 5 alternated runs on a busy machine).
  gc.freeze()
  gc.set_threshold(10_000, 10, 10)
  try:
    app.run(main, **kwargs)
    code = 0
  except SystemExit as e:
    code = e.code
  if code is None:
    code = 0
  elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
    print(code, file=sys.stderr)
    code = 1
  shutdown = getattr(threading, "_shutdown", None)  # what the interpreter does first
  if shutdown is not None:
    shutdown()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access
