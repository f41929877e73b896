"""Quantization throughput: te_ext vs the compressed-tensors reference (same result, checked bit for bit).

For each format and weight size it times the full weight quantization -- statistics (amax), scales, codes,
packing -- and reports GB/s of *input read* (numel * input element size / time). The compressed-tensors reference
is the pipeline its observers + compressors run: min/max statistics, ``generate_gparam`` / ``calculate_qparams``
(or ``compute_dynamic_scales_and_zp``), and the format's compressor (``NVFP4PackedCompressor``,
``MXFP4PackedCompressor``, ``NaiveQuantizationCompressor``), with its ``torch.compile``'d ``cast_to_fp4`` warmed up
before timing. ``same`` says whether codes and scales are bit-identical.

The device-copy bandwidth (``dst.copy_(x)`` into a preallocated ``dst``) is measured on the same tensor, in the
same run, and reported as the ratio te_ext GB/s / copy GB/s (the read+write of a copy vs the read of the input; on
a GPU this is the "fraction of memory bandwidth" figure). The destination is allocated once: a fresh
``torch.empty_like(x)`` per copy (what this bench timed before) mostly measures the page faults of a new 90 MB CPU
allocation (1.8 vs 14 GB/s on the 2-core CI machine), not the memory bandwidth.

Acceptance row (issue 12): NVFP4 on a 4096x11008 bf16 tensor on CPU, at least 10% of the copy bandwidth:

    .venv/bin/python bench/quant_bench.py --formats nvfp4 --sizes 4096x11008 --no-reference

    .venv/bin/python bench/quant_bench.py --quick            # < 1 minute
    .venv/bin/python bench/quant_bench.py --threads 2 --out bench/results/quant_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_ext  # noqa: E402

SIZES_FULL = [(1024, 1024), (4096, 4096), (4096, 11008)]
SIZES_QUICK = [(1024, 1024), (2048, 2048)]
CASES = [
    ("nvfp4", {}, "NVFP4"),
    ("mxfp4", {}, "MXFP4"),
    ("fp8", {"granularity": "tensor"}, "FP8"),
    ("fp8", {"granularity": "channel"}, "FP8_DYNAMIC"),
    ("fp8", {"granularity": "block"}, "FP8_BLOCK"),
    ("int8", {"arith": "compressed_tensors"}, "INT8"),
]


def _case_name(fmt: str, opts: dict) -> str:
    return fmt if not opts.get("granularity") else f"{fmt}-{opts['granularity']}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps: int, budget_s: float) -> tuple[float, float]:
    """(best, median) wall time of ``fn`` over up to ``reps`` runs (fewer if the budget is spent), after one warm-up.

    The tables use the best run: on a shared machine the median mostly measures the neighbours' load."""
    fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return min(times), statistics.median(times)


# --------------------------------------------------------------------------- compressed-tensors reference pipeline
def ct_reference(w: torch.Tensor, preset: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import (
        calculate_qparams,
        compute_dynamic_scales_and_zp,
        generate_gparam,
        maybe_pad_tensor_for_block_quant,
    )

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    wf = w.float()
    if preset == "NVFP4":
        lo, hi = torch.aminmax(wf)
        gs = generate_gparam(lo.reshape(1), hi.reshape(1))
        scale, zp = compute_dynamic_scales_and_zp(value=wf, args=args, module=None, global_scale=gs)
        sd = {"weight": w, "weight_scale": scale, "weight_global_scale": gs, "weight_zero_point": zp}
        return NVFP4PackedCompressor.compress(sd, scheme)
    if preset == "MXFP4":
        scale, zp = compute_dynamic_scales_and_zp(value=wf, args=args, module=None)
        return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(wf)
    elif args.strategy == "channel":
        lo, hi = wf.amin(dim=-1, keepdim=True), wf.amax(dim=-1, keepdim=True)
    else:
        bh, bw = args.block_structure
        wp = maybe_pad_tensor_for_block_quant(wf, (bh, bw))
        tiles = wp.reshape(wp.shape[0] // bh, bh, wp.shape[1] // bw, bw)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    return NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)


def same_result(qt: te_ext.QuantizedTensor, ref: dict[str, torch.Tensor]) -> bool:
    ours = qt.state_dict()
    for name, t in ref.items():
        if name == "weight_zero_point":
            continue
        o = ours.get(name)
        if o is None:
            return False
        a, b = o.reshape(t.shape), t
        if a.dtype != b.dtype:
            return False
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        if not torch.equal(a, b):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (< 1 minute)")
    ap.add_argument("--out", default="bench/results/quant_bench.json", help="JSON output path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-reference", action="store_true", help="time te_ext only")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument(
        "--formats",
        default=None,
        help="comma-separated subset of the rows to time, by their name: "
        + ",".join(dict.fromkeys(_case_name(f, o) for f, o, _ in CASES)),
    )
    ap.add_argument(
        "--sizes", default=None, help="comma-separated shapes to time instead of the defaults, e.g. 4096x11008"
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    if args.sizes:
        sizes = [tuple(int(d) for d in s.split("x")) for s in args.sizes.split(",")]
    cases = CASES
    if args.formats:
        wanted = set(args.formats.split(","))
        cases = [c for c in CASES if _case_name(c[0], c[1]) in wanted]
        unknown = wanted - {_case_name(f, o) for f, o, _ in CASES}
        if unknown:
            ap.error(f"unknown --formats {sorted(unknown)}")
    reps = args.reps or (5 if args.quick else 9)
    budget = 2.0 if args.quick else 20.0
    ref_reps = 2 if args.quick else 3

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape in sizes:
        w = (torch.randn(*shape, generator=gen) * 0.02).to(dtype).to(device)
        in_bytes = w.numel() * w.element_size()
        dst = torch.empty_like(w)
        t_copy, _ = timeit(lambda w=w, dst=dst: dst.copy_(w), device, reps, budget)
        del dst
        copy_gbs = in_bytes / t_copy / 1e9
        for fmt, opts, preset in cases:
            t_ours, t_ours_med = timeit(
                lambda w=w, fmt=fmt, opts=opts: te_ext.quantize(w, fmt, **opts), device, reps, budget
            )
            row = {
                "fmt": _case_name(fmt, opts),
                "shape": list(shape),
                "dtype": args.dtype,
                "te_ext_ms": t_ours * 1e3,
                "te_ext_median_ms": t_ours_med * 1e3,
                "te_ext_gbs": in_bytes / t_ours / 1e9,
                "copy_gbs": copy_gbs,
                "te_ext_vs_copy": (in_bytes / t_ours / 1e9) / copy_gbs,
            }
            if not args.no_reference:
                ref = ct_reference(w, preset)  # also warms up torch.compile
                row["same"] = same_result(te_ext.quantize(w, fmt, **opts), ref)
                t_ref, t_ref_med = timeit(lambda w=w, preset=preset: ct_reference(w, preset), device, ref_reps, budget)
                row["ref_ms"] = t_ref * 1e3
                row["ref_median_ms"] = t_ref_med * 1e3
                row["ref_gbs"] = in_bytes / t_ref / 1e9
                row["speedup"] = t_ref / t_ours
            rows.append(row)
            print_row(row, header=len(rows) == 1)

    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "reps": reps,
        "note": "times are best-of-N (medians in *_median_ms); GB/s = input bytes read / best time; "
        "vs copy = te_ext GB/s / (input bytes / best time of dst.copy_(x), dst preallocated)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}  ({meta['device_name']}, {meta['torch_threads']} torch threads)")
    bad = [r for r in rows if r.get("same") is False]
    if bad:
        print(f"WARNING: {len(bad)} case(s) differ from the reference: {[(r['fmt'], r['shape']) for r in bad]}")
        return 1
    return 0


def print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'format':<14}{'shape':>12}  {'te_ext ms':>10}{'GB/s':>8}  {'ref ms':>10}{'GB/s':>8}"
            f"{'speedup':>9}{'same':>6}  {'copy GB/s':>9}{'vs copy':>8}"
        )
    shape = "x".join(map(str, r["shape"]))
    ref = (
        f"{r['ref_ms']:>10.1f}{r['ref_gbs']:>8.2f}{r['speedup']:>8.1f}x{('yes' if r['same'] else 'NO'):>6}"
        if "ref_ms" in r
        else f"{'-':>10}{'-':>8}{'-':>9}{'-':>6}"
    )
    print(
        f"{r['fmt']:<14}{shape:>12}  {r['te_ext_ms']:>10.1f}{r['te_ext_gbs']:>8.2f}  {ref}"
        f"  {r['copy_gbs']:>9.2f}{r['te_ext_vs_copy']:>8.2f}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
