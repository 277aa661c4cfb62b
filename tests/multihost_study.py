"""`benchmarks/run.py` for the multi-process tests (tests/test_multihost.py), with JAX's
persistent compilation cache written by every process, not only process 0.

JAX writes cache entries from process 0 alone (`jax._src.compiler._cache_write`: shared
file systems). Process 1's programs have keys of their own (its devices are in the
compile options and the topology), so without its writes process 1 compiles every
program again on each run of the suite. Here each process writes its own entries into
the test cache: a rerun loads them in both processes. The programs, the collectives
and the processes are the same; only where the compiled binaries come from differs.
Where JAX lacks that function, the study runs with JAX's behaviour.
"""

import warnings

from jax._src import compiler
from jax._src import compilation_cache
from jax._src import distributed


def write_cache_from_every_process() -> None:
  """JAX writes this process's cache entries whatever its process id."""
  write = getattr(compiler, "_cache_write", None)
  if write is None:
    return

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                  host_callbacks):
    if distributed.global_state.process_id == 0 or host_callbacks:
      return write(cache_key, compile_time_secs, module_name, backend, executable,
                   host_callbacks)
    try:
      compilation_cache.put_executable_and_time(cache_key, module_name, executable,
                                                backend, int(compile_time_secs))
    except Exception as e:  # pylint: disable=broad-except  (as JAX: a warning)
      warnings.warn(f"Error writing persistent compilation cache entry for "
                    f"{module_name!r}: {type(e).__name__}: {e}")

  compiler._cache_write = cache_write  # pylint: disable=protected-access


if __name__ == "__main__":
  # (imported here: the command's flags are not the multihost_worker's)
  from fedjax_dx.cli._exit import run_app  # pylint: disable=g-import-not-at-top
  from fedjax_dx.cli._run import main, parse_flags  # pylint: disable=g-import-not-at-top
  write_cache_from_every_process()
  run_app(main, flags_parser=parse_flags)
