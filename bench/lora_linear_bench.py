"""QeRL's frozen NVFP4 linear vs a bf16 linear: forward + backward time and the memory each keeps, per layer shape.

The frozen linear (``te_ext.frozen_linear``) holds a weight as NVFP4 codes + scales and decodes it in the forward and
again in the backward; the bf16 baseline is a frozen ``[N, K]`` bf16 weight (``x @ W^T``, autograd keeps nothing
extra either: the weight is a leaf). Shapes: the q/o (``H x H``), gate/up (``F x H``) and down (``H x F``) linears of
Qwen2.5-7B and -32B; tokens = one micro-batch of 4 x 1024.

    .venv/bin/python bench/lora_linear_bench.py                 # CUDA when available, else CPU (fewer tokens)
    .venv/bin/python bench/lora_linear_bench.py --tokens 256 --json out.json

Prints a table and writes JSON (``--json``, default ``bench/results/lora_linear.json``). Absolute times hold only
for the device they were taken on; the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import te_ext  # noqa: E402

SHAPES = {
    "7b q/o [3584x3584]": (3584, 3584),
    "7b gate/up [18944x3584]": (18944, 3584),
    "7b down [3584x18944]": (3584, 18944),
    "32b q/o [5120x5120]": (5120, 5120),
    "32b gate/up [27648x5120]": (27648, 5120),
    "32b down [5120x27648]": (5120, 27648),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def bench(n: int, k: int, tokens: int, device: torch.device, reps: int) -> dict[str, float]:
    w = torch.randn(n, k, device=device, dtype=torch.float32) * 0.02
    qt = te_ext.quantize(w, "nvfp4")
    packed, scale, gscale = qt.codes, qt.scales["weight_scale"], qt.scales["weight_global_scale"]
    dense = qt.dequantize(torch.bfloat16)
    del w
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True)

    def decode() -> torch.Tensor:
        return te_ext.dequantize_nvfp4_checkpoint(packed, scale, gscale, (n, k), torch.bfloat16)

    def frozen() -> None:
        te_ext.frozen_linear(x, decode).float().square().mean().backward()

    def bf16() -> None:
        (x @ dense.t()).float().square().mean().backward()

    t_frozen, t_bf16 = _time(frozen, device, reps), _time(bf16, device, reps)
    nvfp4_bytes = sum(t.numel() * t.element_size() for t in (packed, scale, gscale))
    return {
        "frozen_nvfp4_s": t_frozen,
        "bf16_s": t_bf16,
        "ratio": t_frozen / t_bf16,
        "nvfp4_weight_bytes": nvfp4_bytes,
        "bf16_weight_bytes": dense.numel() * 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=0, help="rows of x (default 4096 on CUDA, 256 on CPU)")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated keys of SHAPES")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "lora_linear.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.tokens or (4096 if device.type == "cuda" else 256)
    reps = args.reps or (20 if device.type == "cuda" else 2)
    rows = {}
    print(f"device {device}, {tokens} tokens, {reps} reps: forward + backward (input grad) per layer")
    print(
        "| shape | frozen NVFP4 (s) | bf16 (s) | ratio | NVFP4 weight MB | bf16 weight MB |\n|---|---|---|---|---|---|"
    )
    for key in args.shapes.split(","):
        n, k = SHAPES[key]
        r = bench(n, k, tokens, device, reps)
        rows[key] = r
        print(
            f"| {key} | {r['frozen_nvfp4_s']:.4f} | {r['bf16_s']:.4f} | {r['ratio']:.2f} | "
            f"{r['nvfp4_weight_bytes'] / 1e6:.1f} | {r['bf16_weight_bytes'] / 1e6:.1f} |",
            flush=True,
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "tokens": tokens, "reps": reps, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
