#!/usr/bin/env bash
# Installs Slurm, munge and shellcheck from the system's packages (Debian: slurm-wlm, munge, shellcheck), for the
# tests that start a one-node Slurm cluster (tests/slurm_cluster.py) and the shellcheck test. Called by
# scripts/setup_env.sh; tries once per checkout (stamp below), and never fails the set-up: without root or apt-get
# it prints one line saying what to install, and those tests skip naming what is missing.
# QRL_INSTALL_SLURM=0 skips it; QRL_INSTALL_SLURM=force tries again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAMP="$ROOT/.venv/.qrl-slurm-v1"
PACKAGES=(slurm-wlm munge shellcheck)
WANT="${QRL_INSTALL_SLURM:-1}"

[[ "$WANT" != "0" ]] || exit 0
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
  && command -v munged >/dev/null && command -v shellcheck >/dev/null; then
  exit 0
fi
[[ ! -f "$STAMP" || "$WANT" == "force" ]] || exit 0
mkdir -p "$(dirname "$STAMP")"
date -u '+%F %T' >"$STAMP"
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "[setup] Slurm tests will skip: install ${PACKAGES[*]} (Debian: sudo apt-get install -y ${PACKAGES[*]})" >&2
  exit 0
fi
echo "[setup] installing ${PACKAGES[*]} with apt-get (~1 min)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq "${PACKAGES[@]}"; } >"$STAMP.log" 2>&1; then
  echo "[setup] warning: apt-get install ${PACKAGES[*]} failed (see $STAMP.log); the Slurm tests will skip" >&2
fi
# The packages' own services are not used (the tests start their own daemons); on a system with systemd they
# may have been started: nothing here depends on them either way.
exit 0
