"""Launchers: `qrl-launch` (launch.cli) over `launch.local` and `launch.slurm` (nemo-run), `launch.sbatch` (renders slurm/*.sbatch),
`launch.job_info` (what the sbatch scripts learn from a config). See docs/launch.md."""
