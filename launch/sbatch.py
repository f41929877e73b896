"""Fill in the plain sbatch scripts of slurm/ for one job: #SBATCH options, default arguments, environment.

    python -m launch.sbatch learner configs/x.yaml learner.tp=4 learner.dp=4 \\
        --nodes 2 --gpus-per-node 8 --account A --partition P -o runs/learner.sbatch
    sbatch runs/learner.sbatch

The scripts in slurm/ stay directly submittable (`sbatch ... slurm/learner.sbatch CONFIG ...`); rendering only
rewrites their #SBATCH block, exports the given environment variables and makes CONFIG + overrides the default
arguments, so the rendered file is one self-contained record of the job. Pure Python, no Slurm needed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launch.common import REPO_ROOT, load_checked_config, parse_env

SLURM_DIR = REPO_ROOT / "slurm"
TEMPLATES = ("learner", "rollout_servers")
WATCHDOG_BEGIN = "# --- qrl watchdog begin ---"
WATCHDOG_END = "# --- qrl watchdog end ---"
RENDERED_MARK = "# --- set by launch/sbatch.py ---"

_OPTION_RE = re.compile(r"^#SBATCH\s+--([A-Za-z][\w-]*)(?:[=\s]\s*(\S.*?))?\s*$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")


def template_text(template_name: str) -> str:
    """The script slurm/<template_name>.sbatch ('learner' or 'rollout_servers')."""
    name = template_name.removesuffix(".sbatch")
    if name not in TEMPLATES:
        raise ValueError(f"unknown sbatch template {template_name!r}; choose one of {', '.join(TEMPLATES)}")
    return (SLURM_DIR / f"{name}.sbatch").read_text()


def sbatch_options(text: str) -> dict[str, str | None]:
    """The `#SBATCH --name[=value]` options of a script, in order (a flag without value maps to None)."""
    options: dict[str, str | None] = {}
    for line in text.splitlines():
        m = _OPTION_RE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
    return options


def watchdog_function() -> str:
    """The bash function `qrl_watchdog` of slurm/learner.sbatch (also used by the nemo-run Slurm launcher)."""
    text = template_text("learner")
    start, end = text.index(WATCHDOG_BEGIN), text.index(WATCHDOG_END) + len(WATCHDOG_END)
    return text[start:end] + "\n"


def _gpu_count(value: str | None) -> int | None:
    if value is None:
        return None
    count = value.rsplit(":", 1)[-1]  # --gpus-per-node=h100:8
    return int(count) if count.isdigit() else None


def _option_value(name: str, value: object) -> str | None:
    if value is True:
        return None
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"sbatch option --{name}={text!r}: the value must be non-empty and contain no whitespace")
    return text


def render_sbatch(
    template_name: str,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, object] | None = None,
    validate: bool = True,
    **sbatch: object,
) -> str:
    """slurm/<template_name>.sbatch with its #SBATCH block updated and CONFIG/overrides/env baked in.

    sbatch: option names in snake case (nodes=2, gpus_per_node=8, account="a", time="04:00:00", exclusive=True);
    None leaves the script's default, False removes the option. With validate (default) and a config, the learner
    template checks nodes * gpus_per_node == learner.tp*pp*dp (ValueError naming the keys).
    """
    text = template_text(template_name)
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not at:
        raise ValueError(f"{template_name}: no #SBATCH block")
    first, last = at[0], at[-1]
    options = sbatch_options("\n".join(lines[first : last + 1]))
    for key, value in sbatch.items():
        name = key.replace("_", "-")
        if not _NAME_RE.match(name):
            raise ValueError(f"{key!r} is not an sbatch option name")
        if value is None:
            continue
        if value is False:
            options.pop(name, None)
            continue
        options[name] = _option_value(name, value)

    if validate and config is not None and template_name.removesuffix(".sbatch") == "learner":
        nodes, gpus = options.get("nodes"), _gpu_count(options.get("gpus-per-node"))
        if nodes is None or not nodes.isdigit() or gpus is None:
            raise ValueError("the learner script needs whole numbers for the nodes and gpus_per_node options")
        load_checked_config(config, overrides, int(nodes), gpus)

    block = [f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={value}" for name, value in options.items()]
    extra: list[str] = []
    for key, value in (env or {}).items():
        if not key.isidentifier():
            raise ValueError(f"environment variable name {key!r} is not valid")
        extra.append(f"export {key}={shlex.quote(str(value))}")
    if config is not None:
        args = " ".join(shlex.quote(str(a)) for a in [config, *overrides])
        extra.append(f"if [[ $# -eq 0 ]]; then set -- {args}; fi")
    elif overrides:
        raise ValueError("overrides need a config")
    if extra:
        extra = ["", RENDERED_MARK, *extra]
    out = lines[:first] + block + extra + lines[last + 1 :]
    return "\n".join(out) + "\n"


def _parse_sbatch(items: Sequence[str]) -> dict[str, object]:
    """`--sbatch NAME=VALUE` / `--sbatch NAME` (a flag) to render_sbatch keyword arguments."""
    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.lstrip("-")
        if not _NAME_RE.match(name):
            raise ValueError(f"--sbatch {item!r} must look like NAME=VALUE or NAME (e.g. exclusive, qos=high)")
        out[name.replace("-", "_")] = value if sep else True
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.sbatch",
        description="Render slurm/<template>.sbatch for one job (then: sbatch OUT).",
    )
    p.add_argument("template", choices=TEMPLATES)
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--account", "-A")
    p.add_argument("--partition", "-p")
    p.add_argument("--time", "-t", help="wall-clock limit, e.g. 04:00:00")
    p.add_argument("--job-name", "-J")
    p.add_argument("--sbatch", action="append", default=[], metavar="NAME=VALUE", help="any other #SBATCH option")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="export in the script")
    p.add_argument("-o", "--out", help="write here (default: stdout)")
    args = p.parse_intermixed_args(None if argv is None else list(argv))
    try:
        options: dict[str, Any] = dict(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            account=args.account,
            partition=args.partition,
            time=args.time,
            job_name=args.job_name,
        )
        options.update(_parse_sbatch(args.sbatch))
        text = render_sbatch(
            args.template, config=args.config, overrides=args.overrides, env=parse_env(args.env), **options
        )
    except ValueError as err:
        print(f"launch.sbatch: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote {out}; submit with: sbatch {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
