#!/usr/bin/env bash
# The prepared GPU check: one H100/H200, one call, under 8 minutes (docs/gpu.md).
#
#   bash bench/gpu_check.sh [--megatron-wheel PATH] [--python PY] [--out DIR]
#   bash bench/gpu_check.sh --dry-run          # any machine: every step, each "skipped: needs CUDA" without a GPU
#
# For a machine with torch, Triton and transformers but no vLLM, Transformer Engine or megatron-core: megatron-core
# is installed from a wheel (--megatron-wheel, else the newest megatron_core-*.whl under shared/wheels/ or
# ../shared/wheels/; omegaconf / antlr4 wheels next to it too) with `pip install --no-index --no-deps` into a folder
# of the output (the system site-packages stay untouched; no network). Steps (bench/gpu_check.py), one process
# each, each with its own timeout:
#   (a) learner_full, learner_lora_nvfp4   learner steps of a 0.5B-shaped model, peak memory vs the planner
#   (b) triton_kernels                     te_ext's Triton kernels vs the torch path (bit-exact), GB/s vs copy
#   (c) w4a16_gemm                         NVFP4 W4A16 GEMV/GEMM vs bf16 on the 7B / 32B decode shapes
# Results: docs/results/gpu.md (a table per step) and docs/results/gpu.json; with --dry-run they go to the output
# folder only (a temporary one by default) and docs/results/ is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
WHEEL=""
# the project's .venv where there is one (a CPU checkout: the dry run), else the machine's python3 (the GPU machine)
if [ -x "$ROOT/.venv/bin/python" ]; then PY="${PYTHON:-$ROOT/.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
OUT=""
# per-step limits in seconds: 20 (checks) + 40 (wheel) + 120 + 120 + 60 + 90 + 10 (report) = 460 s, under the 8 minutes
T_LEARNER=120
T_KERNELS=60
T_GEMM=90

usage() {
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --megatron-wheel) WHEEL="${2:?--megatron-wheel needs a path}"; shift ;;
    --python) PY="${2:?--python needs an interpreter}"; shift ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$OUT" ]; then
  if [ "$DRY_RUN" = 1 ]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry.XXXXXX")"; else OUT="$ROOT/bench/results/gpu_check"; fi
fi
mkdir -p "$OUT"
if [ "$DRY_RUN" = 1 ]; then
  MD="$OUT/gpu.md"; JS="$OUT/gpu.json"
else
  MD="$ROOT/docs/results/gpu.md"; JS="$ROOT/docs/results/gpu.json"
fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

echo "== gpu_check: out=$OUT dry_run=$DRY_RUN python=$PY"
# -- environment checks --------------------------------------------------------------------------------------------
HAVE_MEGATRON=0
env_rc=0
env_report="$(timeout 20 "$PY" - 2>&1 <<'EOF'
import importlib.util
try:
    import torch
except ImportError as e:
    raise SystemExit(f"cannot import torch: {e}")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name() if cuda else 'no (torch.cuda.is_available() is False)'}")
for m in ("triton", "transformers", "yaml", "megatron", "vllm", "transformer_engine"):
    print(f"  {m}: {'found' if importlib.util.find_spec(m) is not None else 'missing'}")
EOF
)" || env_rc=$?
echo "$env_report"
if [ "$env_rc" != 0 ]; then
  echo "gpu_check: '$PY' has no usable torch; pass --python PY (an interpreter with torch, Triton, transformers)" >&2
  exit 2
fi
case "$env_report" in *"megatron: found"*) HAVE_MEGATRON=1 ;; esac
if [ "$DRY_RUN" = 0 ]; then
  case "$env_report" in
    *"CUDA no"*)
      echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run with --dry-run on a CPU machine" >&2
      exit 2 ;;
  esac
fi

# -- megatron-core from a wheel -------------------------------------------------------------------------------------
if [ "$HAVE_MEGATRON" = 0 ]; then
  if [ -z "$WHEEL" ]; then
    for dir in "$ROOT/shared/wheels" "$ROOT/../shared/wheels"; do
      if [ -d "$dir" ]; then
        found="$(find "$dir" -maxdepth 1 -name 'megatron_core-*.whl' | sort | tail -n 1)"
        if [ -n "$found" ]; then WHEEL="$found"; break; fi
      fi
    done
  fi
  if [ -z "$WHEEL" ]; then
    echo "megatron-core: missing and no wheel (pass --megatron-wheel PATH or put one in shared/wheels/): the learner steps will fail"
  elif [ "$DRY_RUN" = 1 ]; then
    echo "megatron-core: would install $WHEEL (dry run: not installed)"
  else
    # omegaconf (+ antlr4) next to it, if there: qrl_megatron.config needs it, and with it the newer planner runs too
    extra="$(find "$(dirname "$WHEEL")" -maxdepth 1 \( -name 'omegaconf-*.whl' -o -name 'antlr4_python3_runtime-*.whl' \) | sort)"
    echo "megatron-core: installing $WHEEL ${extra:+and $(echo "$extra" | tr '\n' ' ')}into $OUT/site (pip --no-index --no-deps)"
    # shellcheck disable=SC2086  # $extra: zero or more paths without spaces (find output, one per line)
    timeout 40 "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT/site" "$WHEEL" $extra
    export PYTHONPATH="$PYTHONPATH:$OUT/site"
  fi
else
  echo "megatron-core: found"
fi

# -- steps -------------------------------------------------------------------------------------------------------
STEPS="learner_full learner_lora_nvfp4 triton_kernels w4a16_gemm"
limit_of() {
  case "$1" in
    learner_*) echo "$T_LEARNER" ;;
    triton_kernels) echo "$T_KERNELS" ;;
    *) echo "$T_GEMM" ;;
  esac
}

status=0
if [ "$DRY_RUN" = 1 ]; then
  # one process for all steps (each step's code path is the GPU one, up to its CUDA check): seconds, not minutes
  timeout 120 "$PY" bench/gpu_check.py run --steps "${STEPS// /,}" --out "$OUT" || status=$?
else
  for step in $STEPS; do
    limit="$(limit_of "$step")"
    rc=0
    timeout --kill-after=10 "$limit" "$PY" bench/gpu_check.py run --steps "$step" --out "$OUT" || rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      echo "step $step: FAILED: timed out after $limit s"
      printf '{"step": "%s", "status": "FAILED: timed out after %s s", "seconds": %s}\n' "$step" "$limit" "$limit" \
        > "$OUT/$step.json"
    fi
    if [ "$rc" != 0 ]; then status=1; fi
  done
fi

command="bash bench/gpu_check.sh"
if [ "$DRY_RUN" = 1 ]; then command="$command --dry-run"; fi
timeout 10 "$PY" bench/gpu_check.py report --out "$OUT" --md "$MD" --json "$JS" --command-line "$command"
echo "== gpu_check: steps: $STEPS"
exit "$status"
