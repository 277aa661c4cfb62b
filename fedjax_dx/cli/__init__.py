r"""The `fedjax-dx` command: run a study, redraw its report, list the ready-made configs.

  fedjax-dx run --config=heart_disease --workdir=results/hd [--config.rounds=50 ...]
  fedjax-dx run --config=path/to/my_config.py --workdir=results/mine
  fedjax-dx report --workdir=results/hd
  fedjax-dx configs
  fedjax-dx deploy --config=test --method=fedavg --workdir=/tmp/deployed

`--config` takes a config file's path or the name of a ready-made config (`fedjax-dx
configs` lists them). In the repository, `python -m benchmarks.run` and
`python -m benchmarks.report` are the same commands.
"""

from __future__ import annotations

import os
import sys

_COMMANDS = {
    "run": "run a study (every method x sweep point x seed) into --workdir",
    "report": "draw the figures and report.html of a finished study in --workdir",
    "configs": "list the ready-made configs (usable by name: --config=NAME)",
    "deploy": "run a study's method deployed with Flower on this machine (loopback)",
}


def configs_dir() -> str:
  """The folder of the ready-made configs (`fedjax_dx.configs`)."""
  from fedjax_dx import configs  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.abspath(configs.__file__))


def config_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(configs_dir())
                if f.endswith(".py") and not f.startswith("_"))


def resolve_config(spec: str) -> str:
  """`--config`'s value with a ready-made config's name (`heart_disease`,
  `heart_disease.py`) replaced by its file's path; a path is kept as it is."""
  path, colon, argument = spec.partition(":")
  if os.path.exists(path) or os.sep in path or "/" in path:
    return spec
  name = path[:-3] if path.endswith(".py") else path
  if name in config_names():
    return os.path.join(configs_dir(), name + ".py") + colon + argument
  return spec


def _usage() -> str:
  lines = ["usage: fedjax-dx COMMAND [flags]   (fedjax-dx COMMAND --help for its flags)",
           ""]
  lines += [f"  {name:<8} {what}" for name, what in _COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """The console command's entry point."""
  from absl import app  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command, rest = argv[1], argv[2:]
  program = f"{os.path.basename(argv[0])} {command}"
  if command == "run":
    from fedjax_dx.cli import _exit, _run  # pylint: disable=g-import-not-at-top
    _exit.run_app(_run.main, argv=[program, *rest], flags_parser=_run.parse_flags)
  elif command == "report":
    from fedjax_dx.cli import _exit, _report  # pylint: disable=g-import-not-at-top
    _exit.run_app(_report.main, argv=[program, *rest])
  elif command == "deploy":
    from fedjax_dx.cli import _deploy  # pylint: disable=g-import-not-at-top
    app.run(_deploy.main, argv=[program, *rest], flags_parser=_deploy.parse_flags)
  elif command == "configs":
    for name in config_names():
      print(f"{name:<20} {os.path.join(configs_dir(), name + '.py')}")
  else:
    print(f"error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
    sys.exit(2)


__all__ = ("config_names", "configs_dir", "main", "resolve_config")
