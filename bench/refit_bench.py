"""Weight-refit benchmark: learner TP x PP shards -> bridge (gather, quantize, bucket) -> a real vLLM engine.

For each learner layout it starts the learner processes (gloo on CPU, NCCL on GPU), and for each rollout format a
vLLM engine on rank 0 loaded from a checkpoint in that format; then it times ``--syncs`` full syncs (after one
warm-up) through the same ``BridgeWeightSync`` the trainer uses, checksums verified. It reports seconds per sync,
bytes streamed (and vs bf16) and GB/s of streamed bytes.

    .venv/bin/python bench/refit_bench.py                                  # tiny model, CPU, ~4 minutes
    .venv/bin/python bench/refit_bench.py --layouts 1x1x1 --formats bf16,nvfp4 --syncs 3
    .venv/bin/python bench/refit_bench.py --preset 1b --layouts 1x1x1      # GPU (random weights of that shape)
    .venv/bin/python bench/refit_bench.py --engine none                    # bridge only, no vLLM (rank 0 drops buckets)

The NVFP4 refit acceptance of issue 12 (NVFP4 <= 1.5x bf16 on the 1B shape, CPU, bridge only):

    .venv/bin/python bench/refit_bench.py --preset 1b --engine none --layouts 1x1x1 --formats bf16,nvfp4 --syncs 3

Presets ``1b`` / ``8b`` are synthetic models with the shape of Llama-3.2-1B / Llama-3.1-8B (random weights, the
tiny character vocabulary); they are meant for a GPU machine. Results: a table on stdout and JSON in
``bench/results/refit_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "1b": {
        "hidden_size": 2048,
        "num_layers": 16,
        "num_attention_heads": 32,
        "num_query_groups": 8,
        "ffn_hidden_size": 8192,
    },
    "8b": {
        "hidden_size": 4096,
        "num_layers": 32,
        "num_attention_heads": 32,
        "num_query_groups": 8,
        "ffn_hidden_size": 14336,
    },
}


class DroppingEngine:
    """``--engine none``: the transport stage does nothing, so the figures are those of plan + execute alone."""

    def start_weight_update(self) -> None: ...

    def update_weights(self, tensors: Any, checksums: Any) -> None: ...

    def finish_weight_update(self) -> None: ...

    def close(self) -> None: ...


def _worker(
    rank: int, world: int, port: int, args: argparse.Namespace, model_dir: str, layout: tuple, queue: Any
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    try:
        queue.put((rank, _run(rank, args, model_dir, layout)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        from qrl_megatron.platform import destroy_distributed

        destroy_distributed()


def _run(rank: int, args: argparse.Namespace, model_dir: str, layout: tuple) -> list[dict]:
    from qrl_megatron.bridge.plan import RolloutTarget, build_plan
    from qrl_megatron.bridge.sync import BridgeWeightSync
    from qrl_megatron.config import LearnerConfig
    from qrl_megatron.learner.learner import Learner
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import init_distributed

    tp, pp, dp = layout
    lay = init_distributed(tp, pp, dp, seed=0)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (tp * pp * dp)))
    spec = load_spec(model_dir)
    learner = Learner(
        spec, lay, LearnerConfig(tp=tp, pp=pp, dp=dp, micro_batch_size=1), load_hf_weights(model_dir), 1e-4, 32
    )
    # Without an engine the formats' syncs alternate round by round (bf16, nvfp4, bf16, ...), so a load that comes
    # and goes on a shared machine falls on every format alike and the time ratio stays fair; with a vLLM engine
    # each format has its own engine, started one at a time (memory), and its syncs run back to back.
    groups = [args.formats] if args.engine == "none" else [[fmt] for fmt in args.formats]
    rows = []
    for formats in groups:
        runs = {}
        for fmt in formats:
            plan = build_plan(spec, tp, pp, dp, RolloutTarget(fmt=fmt, bucket_bytes=int(args.bucket_mib * 2**20)))
            engine: Any = None
            if rank == 0:
                engine = DroppingEngine() if args.engine == "none" else _engine(model_dir, fmt)
            sync = BridgeWeightSync(plan)
            sync(learner, engine, 0)  # warm-up
            runs[fmt] = (plan, engine, sync, [], {})
        for step in range(1, args.syncs + 1):
            for _plan, engine, sync, times, last in runs.values():
                metrics = sync(learner, engine, step)
                last.update(metrics)
                if rank == 0:
                    times.append(metrics["sync_seconds"])
        if rank != 0:
            continue
        for fmt, (plan, engine, _sync, times, metrics) in runs.items():
            engine.close()
            rows.append(
                {
                    "layout": f"TP{tp} PP{pp} DP{dp}",
                    "format": fmt,
                    "buckets": plan.num_buckets,
                    "seconds_mean": statistics.mean(times),
                    "seconds_min": min(times),
                    "bytes": metrics["sync_bytes"],
                    "vs_bf16": metrics["sync_bytes_vs_bf16"],
                    "quantized_vs_bf16": metrics.get("sync_quantized_vs_bf16", 1.0),
                    "gbps": metrics["sync_bytes"] / statistics.mean(times) / 1e9,
                }
            )
    return rows


def _engine(model_dir: str, fmt: str) -> Any:
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    directory = model_dir
    if fmt != "bf16":
        from te_ext.vllm_export import export_quantized_checkpoint

        directory = str(export_quantized_checkpoint(model_dir, Path(tempfile.mkdtemp(prefix=f"refit-{fmt}-")), fmt))
    return VLLMEngine(directory, RolloutConfig(kv_cache_mib=64), seed=0, max_model_len=32)


def _run_layout(args: argparse.Namespace, model_dir: str, layout: tuple) -> list[dict]:
    import torch.multiprocessing as mp

    from qrl_megatron.utils.net import free_port

    world = layout[0] * layout[1] * layout[2]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, model_dir, layout, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, value in results.items():
        if isinstance(value, dict) and "error" in value:
            raise RuntimeError(f"rank {rank} failed:\n{value['error']}")
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layouts", default="1x1x1,2x1x1,1x2x1,2x2x1", help="TPxPPxDP list, comma-separated")
    parser.add_argument("--formats", default="bf16,nvfp4,fp8,int8")
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--bucket-mib", type=float, default=64.0)
    parser.add_argument("--engine", choices=["vllm", "none"], default="vllm")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "refit_bench.json"))
    args = parser.parse_args()
    args.formats = args.formats.split(",")
    layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
    if args.preset != "tiny" and not torch.cuda.is_available():
        print(f"note: preset {args.preset} without a GPU runs on CPU (slow; meant for a GPU machine)", flush=True)

    from qrl_megatron.models.tiny import TinyModelConfig, build_tiny_model

    model_dir = str(
        build_tiny_model(
            Path(tempfile.gettempdir()) / f"qrl-refit-{args.preset}", TinyModelConfig(**PRESETS[args.preset])
        )
    )
    rows: list[dict] = []
    for layout in layouts:
        start = time.perf_counter()
        rows += _run_layout(args, model_dir, layout)
        print(f"layout {layout} done in {time.perf_counter() - start:.0f} s", flush=True)

    bf16_seconds = {r["layout"]: r["seconds_mean"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        if r["layout"] in bf16_seconds:
            r["seconds_vs_bf16"] = r["seconds_mean"] / bf16_seconds[r["layout"]]
    header = (
        f"{'layout':<14}{'format':<8}{'buckets':>8}{'s/sync':>10}{'min s':>9}{'time x bf16':>12}{'MB':>10}"
        f"{'bytes x bf16':>13}{'lin x bf16':>11}{'GB/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['seconds_vs_bf16']:>12.2f}" if "seconds_vs_bf16" in r else f"{'-':>12}"
        print(
            f"{r['layout']:<14}{r['format']:<8}{r['buckets']:>8}{r['seconds_mean']:>10.4f}{r['seconds_min']:>9.4f}"
            f"{ratio}{r['bytes'] / 1e6:>10.3f}{r['vs_bf16']:>13.3f}{r['quantized_vs_bf16']:>11.4f}{r['gbps']:>8.4f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "preset": args.preset,
        "engine": args.engine,
        "syncs": args.syncs,
        "bucket_mib": args.bucket_mib,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
