"""`qrl-launch`: the nemo-run launchers behind one command.

    qrl-launch local CONFIG [key=value ...] [--dryrun] [--env NAME=VALUE ...]
    qrl-launch slurm CONFIG [key=value ...] --nodes N --gpus-per-node G [--account A --partition P ...] [--dryrun]

`local` is launch/local.py (nemo-run's LocalExecutor, torchrun, one process per learner rank on this machine);
`slurm` is launch/slurm.py (nemo-run's SlurmExecutor with a LocalTunnel: run it where `sbatch` works). Each
subcommand takes exactly the arguments of `python -m launch.local` / `python -m launch.slurm`; see docs/launch.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = "usage: qrl-launch {local,slurm} CONFIG [key=value ...] [options]  (qrl-launch local --help for the options)"


def _commands() -> dict[str, Callable[[Sequence[str] | None], int]]:
    from launch import local, slurm

    return {"local": local.main, "slurm": slurm.main}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.split("\n\n", 2)[2].strip())
        return 0 if args else 2
    commands = _commands()
    name, rest = args[0], args[1:]
    if name not in commands:
        print(f"qrl-launch: unknown subcommand {name!r}; choose local or slurm\n{USAGE}", file=sys.stderr)
        return 2
    return commands[name](rest)


if __name__ == "__main__":
    sys.exit(main())
