"""Peak host memory per learner rank while loading an HF checkpoint: the sliced reader vs the old full-dict path.

Builds (once, cached) a checkpoint of the Qwen2.5-0.5B shape -- hidden 896, FFN 4864, 24 layers, 14 heads / 2 KV
heads, vocab 151936, tied embeddings, q/k/v bias -- with random bf16 weights, written with safetensors directly as
a sharded folder with ``model.safetensors.index.json``, as the hub publishes it. Then, for each TP size and load
method, a fresh gloo world builds the Megatron model (bf16 parameters, no random initialisation, as the Learner
builds it) and loads the checkpoint. Each rank reports, from ``/proc/self/status``:

* ``base``: RSS after imports and process-group set-up, before the model exists (interpreter, torch, megatron);
* ``peak``: ``VmHWM`` over model construction + loading, after resetting it at ``base`` (``/proc/self/clear_refs``);
* ``peak - base``: what building and loading the model cost this rank -- the figure the issue's targets are about
  (TP=2: < 60% of the model's bytes on disk; TP=1: < 110%);
* ``params``: the bytes of the rank's own parameters (bf16: what a GPU learner holds; its fp32 master copy lives in
  the optimizer, built after loading); ``overhead`` = ``peak - base - params``: what loading needed on top;
* the ``RssAnon`` / ``RssFile`` split at their peaks (sampled every 2 ms): ``RssFile`` is mapped file pages.

Methods: ``new`` -- :class:`~qrl_megatron.models.checkpoint_reader.CheckpointReader` (``pread`` of the rank's slices,
straight into the parameters); ``old`` -- what the loader did before: every shard read whole with
``safetensors.torch.load_file``, ``hf_to_megatron`` on the full dict, ``shard_for_tp``; ``mmap`` -- the same slices
as ``new`` but read through ``safetensors.safe_open(...).get_slice`` with the files kept open for the load (why the
reader does not do that: every page a slice touches stays in ``RssFile``).

    .venv/bin/python bench/load_rss.py                        # TP=1 and TP=2, all methods (~3 minutes on 2 cores)
    .venv/bin/python bench/load_rss.py --tp 2 --methods new

Results: a table on stdout and JSON in ``bench/results/load_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5-0.5B (config.json as published, less the fields this bench does not need)
QWEN25_05B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}
MB = 1 << 20


def build_checkpoint(out: Path, shards: int, seed: int = 0) -> Path:
    """The 0.5B-shaped folder (config.json, ``shards`` safetensors shards, index); reused when already complete."""
    from safetensors.torch import save_file

    from qrl_megatron.models.hf_mapping import hf_tensor_shapes
    from qrl_megatron.models.registry import spec_from_hf_config

    marker = {"config": QWEN25_05B, "shards": shards, "seed": seed, "version": 1}
    if (out / ".bench_marker.json").is_file() and json.loads((out / ".bench_marker.json").read_text()) == marker:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    shapes = hf_tensor_shapes(spec_from_hf_config(QWEN25_05B))
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    # Contiguous groups of tensors of about total/shards bytes each, in canonical order (as save_pretrained does);
    # one shard in memory at a time.
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if groups[-1] and size + nbytes > total / shards and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(QWEN25_05B, indent=2))
    (out / ".bench_marker.json").write_text(json.dumps(marker))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Per-rank measurement
# ----------------------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler(threading.Thread):
    """Peak RssAnon / RssFile, sampled (VmHWM only gives the peak of their sum)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.002)


class _MmapSlices:
    """The reader's slice interface over ``safetensors.safe_open`` handles kept open for the whole load."""

    def __init__(self, model_dir: str) -> None:
        from safetensors import safe_open

        from qrl_megatron.models.checkpoint_reader import CheckpointReader

        self._reader = CheckpointReader(model_dir)  # the index, validated; data through safe_open below
        self._handles = {f: safe_open(str(f), framework="pt") for f in self._reader.files}

    def __iter__(self) -> Any:
        return iter(self._reader)

    def __len__(self) -> int:
        return len(self._reader)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name)

    def where(self, name: str) -> str:
        return self._reader.where(name)

    def read_slice(self, name, dim=0, start=0, stop=None, *, dtype=None, out=None):  # type: ignore[no-untyped-def]
        sl = self._handles[self._reader.info(name).file].get_slice(name)
        stop = self.shape(name)[dim] if stop is None else stop
        t = sl[start:stop] if dim == 0 else sl[:, start:stop]
        if out is not None:
            return out.copy_(t)
        return t.to(dtype) if dtype is not None else t


def _load_old(model: torch.nn.Module, model_dir: str, spec: Any, layout: Any) -> None:
    """The loader before the sliced reader: the whole checkpoint in memory, mapped whole, then split."""
    from safetensors.torch import load_file

    from qrl_megatron.learner.model import global_param_name
    from qrl_megatron.models.hf_mapping import hf_to_megatron, pp_layer_offset, shard_for_tp

    full: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        full.update(load_file(str(f)))
    megatron = hf_to_megatron(full, spec)
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    shards = {}
    for name, _ in model.named_parameters():
        g = global_param_name(name, offset)
        src = megatron["embedding.word_embeddings.weight" if g == "output_layer.weight" else g]
        shards[name] = shard_for_tp(g, src, layout.tp, layout.tp_rank, spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shards[name])


def _run(rank: int, tp: int, method: str, model_dir: str) -> dict[str, Any]:
    from qrl_megatron.learner.model import build_gpt_model, load_hf_state_dict
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import init_distributed

    torch.set_num_threads(1)
    layout = init_distributed(tp, 1, 1, seed=0)
    spec = load_spec(model_dir)
    base = _status()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is that of build + load
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    # as the Learner builds it: bf16 parameters, no random initialisation (every parameter is loaded)
    model = build_gpt_model(
        spec, layout, params_dtype=torch.bfloat16, config_overrides={"perform_initialization": False}
    )
    t1 = time.perf_counter()
    if method == "new":
        load_hf_state_dict(model, load_hf_weights(model_dir), spec, layout)
    elif method == "mmap":
        load_hf_state_dict(model, _MmapSlices(model_dir), spec, layout)
    else:
        _load_old(model, model_dir, spec, layout)
    t2 = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    end = _status()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {
        "rank": rank,
        "tp": tp,
        "method": method,
        "base_rss": base["VmRSS"],
        "peak_rss": end["VmHWM"],
        "end_rss": end["VmRSS"],
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
        "base_anon": base["RssAnon"],
        "base_file": base["RssFile"],
        "param_bytes": params,
        "build_s": t1 - t0,
        "load_s": t2 - t1,
        "checksum": checksum,
    }


def _worker(rank: int, world: int, port: int, tp: int, method: str, model_dir: str, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    try:
        queue.put((rank, _run(rank, tp, method, model_dir)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        from qrl_megatron.platform import destroy_distributed

        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(tp: int, method: str, model_dir: str, timeout: float) -> list[dict[str, Any]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, tp, port, tp, method, model_dir, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError(f"tp={tp} {method}: a rank failed:\n{errors[0]}")
    return [results[r] for r in range(tp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["old", "mmap", "new"], choices=["old", "mmap", "new"])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "bench_load_rss" / "qwen2.5-0.5b-shape")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "load_rss.json")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    from qrl_megatron.models.checkpoint_reader import CheckpointReader

    t0 = time.perf_counter()
    model_dir = build_checkpoint(args.checkpoint, args.shards)
    reader = CheckpointReader(model_dir)
    model_bytes, files = reader.nbytes, len(reader.files)
    print(f"checkpoint {model_dir}: {model_bytes / MB:.0f} MiB of bf16 tensors in {files} shards "
          f"(ready in {time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip

    rows = []
    for tp in args.tp:
        for method in args.methods:
            for r in measure(tp, method, str(model_dir), args.timeout):
                r["cost"] = r["peak_rss"] - r["base_rss"]
                r["cost_vs_model"] = r["cost"] / model_bytes
                r["overhead"] = r["cost"] - r["param_bytes"]
                rows.append(r)
                print(f"  tp={tp} {method:4s} rank {r['rank']}: peak-base {r['cost'] / MB:.0f} MiB", flush=True)

    targets = {1: 1.10, 2: 0.60}
    head = (
        f"{'TP':>2} {'method':6} {'rank':>4} {'base':>6} {'peak':>6} {'peak-base':>9} {'vs model':>8} "
        f"{'params':>6} {'overhead':>8} {'anon pk':>7} {'file pk':>7} {'load s':>6}"
    )
    print(f"\nmodel on disk: {model_bytes / MB:.0f} MiB (bf16); parameters bf16 (a GPU learner's copy; the fp32 "
          "master lives in the optimizer, built after loading); MiB per rank")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['tp']:>2} {r['method']:6} {r['rank']:>4} {r['base_rss'] / MB:>6.0f} {r['peak_rss'] / MB:>6.0f} "
            f"{r['cost'] / MB:>9.0f} {r['cost_vs_model']:>8.1%} {r['param_bytes'] / MB:>6.0f} "
            f"{r['overhead'] / MB:>8.0f} {r['peak_anon'] / MB:>7.0f} {r['peak_file'] / MB:>7.0f} {r['load_s']:>6.1f}"
        )
    verdicts = {}
    for tp, limit in targets.items():
        new = [r for r in rows if r["tp"] == tp and r["method"] == "new"]
        if new:
            worst = max(r["cost_vs_model"] for r in new)
            verdicts[f"tp{tp}"] = {"worst_cost_vs_model": worst, "target": limit, "met": worst < limit}
            print(f"TP={tp} new: worst rank peak-base = {worst:.1%} of the model (target < {limit:.0%}): "
                  f"{'met' if worst < limit else 'NOT met'}")  # fmt: skip
    same = {}
    for tp in args.tp:
        sums = {m: [r["checksum"] for r in rows if r["tp"] == tp and r["method"] == m] for m in args.methods}
        same[f"tp{tp}"] = len({tuple(v) for v in sums.values()}) == 1
    print(f"every method loads the same parameters: {same}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "checkpoint": {"shape": QWEN25_05B, "bytes": model_bytes, "shards": files, "dtype": "bfloat16"},
                "params_dtype": "bfloat16",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
                "rows": rows,
                "targets": verdicts,
                "same_parameters": same,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
