"""`shellcheck` passes on every shell script of the project (and on the sbatch scripts as launch/sbatch.py renders
them). Skipped only where shellcheck is not installed (scripts/setup_slurm.sh installs it with the set-up)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from launch.common import REPO_ROOT
from launch.sbatch import render_sbatch

pytestmark = pytest.mark.unit

SCRIPT_DIRS = ("scripts", "slurm", "bench", "launch", ".ci")
INSTALL = "apt-get install -y shellcheck (scripts/setup_slurm.sh does it as root)"


def shell_scripts() -> list[Path]:
    """*.sh, *.sbatch and every file with a sh/bash shebang in the script folders."""
    found = []
    for folder in SCRIPT_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix in (".sh", ".sbatch"):
                found.append(path)
                continue
            with path.open("rb") as f:
                first = f.readline(200)
            if first.startswith(b"#!") and first.rstrip().split(b"/")[-1].split()[-1] in (b"sh", b"bash"):
                found.append(path)
    return found


def shellcheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip(f"shellcheck is not installed: {INSTALL}")
    return subprocess.run([exe, "--format=gcc", *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_every_script_passes_shellcheck() -> None:
    scripts = shell_scripts()
    names = {p.relative_to(REPO_ROOT).as_posix() for p in scripts}
    assert {".ci/run", "scripts/setup_env.sh", "scripts/setup_slurm.sh", "slurm/learner.sbatch"} <= names
    assert {"slurm/rollout_servers.sbatch", "bench/gpu_check.sh"} <= names
    proc = shellcheck(*scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_sbatch_scripts_pass_shellcheck(tmp_path: Path) -> None:
    config = str(REPO_ROOT / "configs" / "tiny_cpu.yaml")
    rendered = []
    for name in ("learner", "rollout_servers"):
        text = render_sbatch(
            name, config=config, overrides=["seed=3", "run.dir=runs/a b"], env={"NCCL_DEBUG": "WARN"},
            nodes=1, gpus_per_node=8, account="acct", validate=False,
        )  # fmt: skip
        path = tmp_path / f"{name}.sbatch"
        path.write_text(text)
        rendered.append(path)
    proc = shellcheck(*rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr
