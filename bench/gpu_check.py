"""The prepared GPU check: what bench/gpu_check.sh runs on one H100/H200, one function per step.

Steps (each writes ``<out>/<step>.json``; ``report`` turns them into a Markdown table per step and one JSON):

* ``learner_full`` / ``learner_lora_nvfp4`` -- learner steps on the GPU for a Qwen2.5-0.5B-shaped model (its
  published config.json from configs/hf_configs, random weights; the learner section of configs/qwen2.5_0.5b.yaml,
  1 process, TP1 x PP1 x DP1, NCCL single rank): full-parameter, and LoRA (rank 32) on a frozen NVFP4 base.
  ``torch.cuda.max_memory_allocated`` against the planner's prediction
  (:func:`qrl_megatron.learner.memory.planned_learner_memory`: weights, gradients, optimizer state -- exact, from
  the meta-device build; and, where the newer ``qrl_megatron.plan.make_plan`` exists, its learner items with the
  activations).
* ``triton_kernels`` -- te_ext's Triton kernels (NVFP4 and FP8 quantize, te_ext/triton_kernels.py) against te_ext's
  torch path on the same CUDA tensor, bit for bit, and their bandwidth (bytes read + written / time) against the
  device copy bandwidth (``dst.copy_(src)``, read + write) of the same input.
* ``w4a16_gemm`` -- ``nvfp4_w4a16_matmul`` against a bf16 ``torch.matmul`` (cuBLAS) on the linear shapes of
  Qwen2.5-7B and Qwen2.5-32B (configs/hf_configs) at decode batch sizes 1, 16 and 64 tokens; its error against the
  bf16 matmul of the dequantized weight; and the weight-bytes bandwidth of both.

Without CUDA (``--dry-run`` on a CPU machine) every step still runs up to the point where it needs the GPU --
imports, shapes, configs -- and then reports ``skipped: needs CUDA (torch.cuda.is_available() is False)``.

    python bench/gpu_check.py run --steps learner_full --out /tmp/gpu        # one step (the .sh adds a timeout)
    python bench/gpu_check.py report --out /tmp/gpu --md docs/results/gpu.md --json docs/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HF_CONFIGS = ROOT / "configs" / "hf_configs"
NEEDS_CUDA = "skipped: needs CUDA (torch.cuda.is_available() is False)"
GB = 1e9
# the learner steps' batch: 16 sequences of 256 prompt + 256 completion tokens (one micro-batch of the 0.5B recipe)
LEARNER_BATCH, PROMPT_TOKENS, COMPLETION_TOKENS, LEARNER_STEPS = 16, 256, 256, 3
GEMM_MODELS = ("Qwen2.5-7B-Instruct", "Qwen2.5-32B-Instruct")
GEMM_TOKENS = (1, 16, 64)


# ------------------------------------------------------------------------------------------------------ helpers


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _hf_config(name: str) -> dict[str, Any]:
    return json.loads((HF_CONFIGS / f"{name}.json").read_text())


def cuda_time(fn: Callable[[], Any], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events), after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(x: Any) -> float:
    """GB/s of ``dst.copy_(x)`` (bytes read + written), the device's practical memory bandwidth for this size."""
    import torch

    dst = torch.empty_like(x)
    seconds = cuda_time(lambda: dst.copy_(x))
    return 2 * x.numel() * x.element_size() / seconds / GB


def _nbytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------- step (a): learner


def _learner_config(lora: bool) -> Any:
    """The learner section of configs/qwen2.5_0.5b.yaml at TP1 x PP1 x DP1 (LoRA: rank 32 on an NVFP4 base)."""
    import yaml

    from qrl_megatron.learner.config import LearnerConfig, LoRAConfig

    section = dict(yaml.safe_load((ROOT / "configs" / "qwen2.5_0.5b.yaml").read_text())["learner"])
    lora_section = dict(section.pop("lora", {}) or {})
    section.update(tp=1, pp=1, dp=1, micro_batch_size=LEARNER_BATCH)
    if lora:
        section.update(base_format="nvfp4", lr=1e-5)
        lora_section.update(rank=32)
    cfg = LearnerConfig(**section, lora=LoRAConfig(**lora_section))
    cfg.validate("learner")
    return cfg


def _random_hf_weights(spec: Any, seed: int = 0) -> dict[str, Any]:
    """HF-named random weights of ``spec``'s shapes (bf16; norms 1): a pretrained model's memory, not its values."""
    import torch

    from qrl_megatron.models.hf_mapping import hf_tensor_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_tensor_shapes(spec).items():
        if "norm" in name:
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return out


def _random_batch(vocab: int, seq_length: int, seed: int) -> Any:
    import torch

    from qrl_megatron.learner.batch import pack_sequences

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(LEARNER_BATCH)]
    completions = [torch.randint(0, vocab, (COMPLETION_TOKENS,), generator=g).tolist() for _ in range(LEARNER_BATCH)]
    behaviour = [(-torch.rand(COMPLETION_TOKENS, generator=g) * 3).tolist() for _ in range(LEARNER_BATCH)]
    advantages = torch.randn(LEARNER_BATCH, generator=g)
    return pack_sequences(prompts, completions, seq_length, 0, advantages=advantages, rollout_logprobs=behaviour)


def _newer_plan(spec: Any, layout: Any, lora: bool) -> dict[str, Any] | None:
    """The learner items of ``qrl_megatron.plan.make_plan`` for this batch, where that planner exists (it needs the
    full config, hence omegaconf); None otherwise."""
    try:
        from qrl_megatron.config import load_config
        from qrl_megatron.plan import make_plan
    except ImportError:
        return None
    overrides = [
        "learner.tp=1", "learner.pp=1", "learner.dp=1", f"learner.micro_batch_size={LEARNER_BATCH}",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=8", "algo.minibatches=1", "algo.overlong_buffer=0",
        f"rollout.max_new_tokens={COMPLETION_TOKENS}", f"task.max_prompt_tokens={PROMPT_TOKENS}",
    ]  # fmt: skip
    if lora:
        overrides += ["learner.lora.rank=32", "learner.base_format=nvfp4", "rollout.quant=nvfp4"]
        overrides += ["trainer.save_every=0", "trainer.checkpoint=false"]  # LoRA runs are not resumable yet
    cfg = load_config(ROOT / "configs" / "qwen2.5_0.5b.yaml", overrides)
    plan = make_plan(cfg, spec, layout, "qwen2.5_0.5b (gpu_check batch)")
    return {k: v for k, v in plan.items.items() if k.startswith("learner.")}


def step_learner(lora: bool) -> dict[str, Any]:
    import torch

    from qrl_megatron.algos.config import AlgoConfig
    from qrl_megatron.algos.policy_loss import grpo_loss
    from qrl_megatron.learner.learner import Learner
    from qrl_megatron.learner.memory import learner_memory, planned_learner_memory
    from qrl_megatron.models.registry import spec_from_hf_config

    cfg = _learner_config(lora)
    spec = spec_from_hf_config(_hf_config("Qwen2.5-0.5B-Instruct"))
    seq_length = PROMPT_TOKENS + COMPLETION_TOKENS
    result: dict[str, Any] = {
        "model": "Qwen2.5-0.5B shape, random weights",
        "mode": "LoRA r32 on an NVFP4 base" if lora else "full-parameter",
        "precision": cfg.precision,
        "batch": f"{LEARNER_BATCH} x {seq_length} tokens, {LEARNER_STEPS} steps",
    }
    if not _cuda():
        return {**result, "status": NEEDS_CUDA}
    from qrl_megatron.platform import init_distributed

    layout = init_distributed(1, 1, 1, seed=0)
    weights = _random_hf_weights(spec)
    frozen = None
    if lora:
        from qrl_megatron.models.checkpoint_reader import StateDictReader
        from te_ext.vllm_export import quantize_state_dict

        # the engine's NVFP4 checkpoint of the base, as train.py hands it over (quantized on the GPU: seconds)
        codes = quantize_state_dict({k: v.cuda() for k, v in weights.items()}, "nvfp4")
        frozen = StateDictReader({k: v.cpu() for k, v in codes.items()})
        del codes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    learner = Learner(spec, layout, cfg, weights, cfg.lr, seq_length, frozen_base=frozen)
    result["build_seconds"] = time.perf_counter() - start
    del weights, frozen
    loss_fn = grpo_loss(AlgoConfig(clip_low=0.2, clip_high=0.28))
    step_seconds = []
    for step in range(LEARNER_STEPS):
        batch = _random_batch(spec.vocab_size, seq_length, seed=step)
        torch.cuda.synchronize()
        start = time.perf_counter()
        logprobs = learner.logprobs(batch)
        assert logprobs is not None
        batch.old_logprobs = logprobs[0].detach().cpu()
        metrics = learner.train_step(batch, loss_fn, batch.num_tokens, len(batch))
        torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
        if not torch.isfinite(torch.tensor(metrics["loss"])):
            raise RuntimeError(f"learner step {step}: loss {metrics['loss']}")
    held = learner_memory(learner)
    planned = planned_learner_memory(spec, layout, cfg)
    peak = torch.cuda.max_memory_allocated() - base
    static = torch.cuda.memory_allocated() - base
    result.update(
        status="ok",
        step_seconds=step_seconds,
        tokens_per_second=LEARNER_BATCH * seq_length / min(step_seconds),
        peak_allocated_gb=peak / GB,
        allocated_after_steps_gb=static / GB,
        held_gb={k: v / GB for k, v in held.items()},
        planned_gb={k: v / GB for k, v in planned.items()},
        planned_vs_held=planned["total"] / max(held["total"], 1),
        peak_minus_planned_static_gb=(peak - planned["total"]) / GB,
    )
    try:
        newer = _newer_plan(spec, layout, lora)
    except Exception as e:  # noqa: BLE001 - reported, the measurement stands on its own
        result["newer_planner"] = f"error: {type(e).__name__}: {e}"
    else:
        if newer is not None:
            result["newer_planner_gb"] = {k: v / GB for k, v in newer.items()}
            # what torch's allocator sees: the tensors (not the CUDA context, nor the fragmentation allowance)
            tensors = sum(newer.get(f"learner.{k}", 0) for k in NEWER_PLAN_TENSOR_ITEMS)
            result["newer_planner_tensors_gb"] = tensors / GB
            result["peak_vs_newer_planner"] = peak / max(tensors, 1)
    return result


NEWER_PLAN_TENSOR_ITEMS = ("weights", "gradients", "optimizer_state", "activations", "logits")


def step_learner_full() -> dict[str, Any]:
    return step_learner(lora=False)


def step_learner_lora_nvfp4() -> dict[str, Any]:
    return step_learner(lora=True)


# ---------------------------------------------------------------------------------- step (b): Triton kernels

KERNEL_SHAPES = ((4096, 11008), (5120, 27648))


def step_triton_kernels() -> dict[str, Any]:
    import torch

    import te_ext

    result: dict[str, Any] = {"shapes": [list(s) for s in KERNEL_SHAPES], "input": "bf16"}
    if not _cuda():
        return {**result, "status": NEEDS_CUDA}
    from te_ext import triton_kernels as tk

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        return bool(a.shape == b.shape and torch.equal(a, b))

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in KERNEL_SHAPES:
        x = torch.randn(shape, generator=g, device="cuda") * torch.rand(shape[0], 1, generator=g, device="cuda") * 3
        x = x.to(torch.bfloat16)
        x[0, :16] = 0  # an all-zero block (the scale's zero case)
        copy_gbps = copy_bandwidth(x)
        ref = te_ext.quantize(x, "nvfp4")
        gs = ref.scales["weight_global_scale"]
        q, s = tk.nvfp4_quantize(x, gs)
        out_bytes = _nbytes(q, s)
        seconds = cuda_time(lambda: tk.nvfp4_quantize(x, gs))  # noqa: B023
        torch_seconds = cuda_time(lambda: te_ext.quantize(x, "nvfp4"), iters=5, warmup=1)  # noqa: B023
        gbps = (_nbytes(x) + out_bytes) / seconds / GB
        rows.append(
            {
                "kernel": "nvfp4_quantize",
                "shape": list(shape),
                "bit_exact": same(q, ref.codes) and same(s, ref.scales["weight_scale"]),
                "seconds": seconds,
                "gbps": gbps,
                "copy_gbps": copy_gbps,
                "vs_copy": gbps / copy_gbps,
                "torch_path_seconds": torch_seconds,
            }
        )
        for gran in ("tensor", "channel"):
            f = te_ext.quantize(x, "fp8", granularity=gran)
            scale = f.scales["weight_scale"]
            codes = tk.fp8_quantize(x, scale)
            seconds = cuda_time(lambda: tk.fp8_quantize(x, scale))  # noqa: B023
            gbps = (_nbytes(x) + _nbytes(codes)) / seconds / GB
            rows.append(
                {
                    "kernel": f"fp8_quantize ({gran})",
                    "shape": list(shape),
                    "bit_exact": same(codes, f.codes),
                    "seconds": seconds,
                    "gbps": gbps,
                    "copy_gbps": copy_gbps,
                    "vs_copy": gbps / copy_gbps,
                    "torch_path_seconds": cuda_time(
                        lambda: te_ext.quantize(x, "fp8", granularity=gran),  # noqa: B023
                        iters=5,
                        warmup=1,
                    ),
                }
            )
    result.update(status=kernels_status(rows), rows=rows)
    return result


def kernels_status(rows: list[dict[str, Any]]) -> str:
    """The kernels' gate: every one bit-identical to te_ext's torch path."""
    bad = [f"{r['kernel']} {'x'.join(map(str, r['shape']))}" for r in rows if not r["bit_exact"]]
    return "ok" if not bad else "FAILED: not bit-exact: " + ", ".join(bad)


# ------------------------------------------------------------------------------------ step (c): W4A16 GEMM


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) = (out, in) of each decoder-layer linear of an HF config, as vLLM fuses them (qkv, gate_up)."""
    c = _hf_config(name)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or hidden // heads
    return {
        "qkv_proj": ((heads + 2 * kv) * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_up_proj": (2 * inter, hidden),
        "down_proj": (hidden, inter),
    }


def step_w4a16_gemm() -> dict[str, Any]:
    import torch

    import te_ext

    shapes = {m: linear_shapes(m) for m in GEMM_MODELS}
    result: dict[str, Any] = {
        "tokens": list(GEMM_TOKENS),
        "shapes": {m: {k: list(v) for k, v in s.items()} for m, s in shapes.items()},
    }
    if not _cuda():
        return {**result, "status": NEEDS_CUDA}
    from te_ext import triton_kernels as tk

    rows, worst = [], 0.0
    g = torch.Generator(device="cuda").manual_seed(0)
    for model, linears in shapes.items():
        for linear, (n, k) in linears.items():
            w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
            qt = te_ext.quantize(w, "nvfp4")
            packed, scale, gs = qt.codes, qt.scales["weight_scale"], qt.scales["weight_global_scale"]
            w_deq = qt.dequantize(torch.bfloat16)
            del w
            weight_bytes_fp4 = _nbytes(packed, scale)
            copy_gbps = copy_bandwidth(w_deq)
            for m in GEMM_TOKENS:
                x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
                out = tk.nvfp4_w4a16_matmul(x, packed, scale, gs)
                ref = x @ w_deq.T
                err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
                worst = max(worst, err)
                t_fp4 = cuda_time(lambda: tk.nvfp4_w4a16_matmul(x, packed, scale, gs))  # noqa: B023
                t_bf16 = cuda_time(lambda: x @ w_deq.T)  # noqa: B023
                rows.append(
                    {
                        "model": model,
                        "linear": linear,
                        "n": n,
                        "k": k,
                        "tokens": m,
                        "w4a16_us": t_fp4 * 1e6,
                        "bf16_us": t_bf16 * 1e6,
                        "speedup_vs_bf16": t_bf16 / t_fp4,
                        "w4a16_weight_gbps": weight_bytes_fp4 / t_fp4 / GB,
                        "bf16_weight_gbps": _nbytes(w_deq) / t_bf16 / GB,
                        "copy_gbps": copy_gbps,
                        "rel_err_vs_bf16_dequant": err,
                    }
                )
    result.update(status=gemm_status(worst), rows=rows)
    return result


# fp32 accumulation on both sides: what differs is the order of the sums and the bf16 rounding of the output
# (~4e-3 relative to the largest output); a wrong scale or nibble order is off by O(1)
GEMM_TOLERANCE = 2e-2


def gemm_status(worst_rel_err: float) -> str:
    """The W4A16 gate: max |W4A16 - bf16(dequantized W)| / max |bf16| within GEMM_TOLERANCE on every shape."""
    if worst_rel_err <= GEMM_TOLERANCE:
        return "ok"
    return f"FAILED: relative error {worst_rel_err:.3g} > {GEMM_TOLERANCE} against the bf16 matmul of the same weights"


STEPS: dict[str, Callable[[], dict[str, Any]]] = {
    "learner_full": step_learner_full,
    "learner_lora_nvfp4": step_learner_lora_nvfp4,
    "triton_kernels": step_triton_kernels,
    "w4a16_gemm": step_w4a16_gemm,
}


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": _cuda()}
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
    import importlib.metadata
    import importlib.util

    # versions from the installed metadata: importing transformers / megatron only to print them costs seconds
    for module, dist in (("triton", "triton"), ("transformers", "transformers"), ("megatron", "megatron-core")):
        if importlib.util.find_spec(module) is None:
            env[module] = "missing"
            continue
        try:
            env[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[module] = "present"
    return env


def run(steps: list[str], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(environment(), indent=2))
    failed = 0
    for name in steps:
        start = time.perf_counter()
        try:
            result = STEPS[name]()
        except Exception as e:  # noqa: BLE001 - one step's failure is its row, the others still run
            result = {"status": f"FAILED: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - start
        result["step"] = name
        failed += str(result["status"]).startswith("FAILED")
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"step {name}: {result['status']} ({result['seconds']:.1f} s)", flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ report


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def _learner_md(r: dict[str, Any]) -> list[str]:
    lines = [f"{r.get('mode', '')}, {r.get('precision', '')}, {r.get('batch', '')}", ""]
    if r.get("status") != "ok":
        return lines
    held, planned = r["held_gb"], r["planned_gb"]
    items = [k for k in planned if k in held]
    lines += _table(["item", "held (GB)", "planned (GB)"], [[k, held[k], planned[k]] for k in items])
    lines += [
        "",
        f"peak allocated {r['peak_allocated_gb']:.3f} GB (torch.cuda.max_memory_allocated), allocated after the "
        f"steps {r['allocated_after_steps_gb']:.3f} GB; planned weights + gradients + optimizer "
        f"{planned['total']:.3f} GB (planned / held {r['planned_vs_held']:.4f}); peak - planned static "
        f"{r['peak_minus_planned_static_gb']:.3f} GB (activations, logits, workspaces); step seconds "
        f"{', '.join(f'{s:.2f}' for s in r['step_seconds'])}.",
    ]
    if "newer_planner_gb" in r:
        lines += [
            "",
            f"qrl_megatron.plan: weights + gradients + optimizer + activations + logits "
            f"{r['newer_planner_tensors_gb']:.3f} GB; measured peak / that {r['peak_vs_newer_planner']:.3f}. "
            "Its learner items (GB): " + json.dumps({k: round(v, 4) for k, v in r["newer_planner_gb"].items()}),
        ]
    elif "newer_planner" in r:
        lines += ["", f"qrl_megatron.plan: {r['newer_planner']}"]
    return lines


def _kernels_md(r: dict[str, Any]) -> list[str]:
    if "rows" not in r:
        return [f"shapes {r.get('shapes')}, bf16 input"]
    return _table(
        ["kernel", "shape", "bit-exact", "GB/s", "copy GB/s", "vs copy", "torch path ms"],
        [
            [x["kernel"], "x".join(map(str, x["shape"])), x["bit_exact"], x["gbps"], x["copy_gbps"], x["vs_copy"],
             x["torch_path_seconds"] * 1e3]
            for x in r["rows"]
        ],
    )  # fmt: skip


def _gemm_md(r: dict[str, Any]) -> list[str]:
    if "rows" not in r:
        return [f"models {', '.join(GEMM_MODELS)}, tokens {r.get('tokens')}, linears (N, K): {r.get('shapes')}"]
    return _table(
        ["model", "linear", "N x K", "tokens", "W4A16 us", "bf16 us", "speed-up", "W4A16 weight GB/s", "copy GB/s",
         "rel. err"],
        [
            [x["model"], x["linear"], f"{x['n']}x{x['k']}", x["tokens"], x["w4a16_us"], x["bf16_us"],
             x["speedup_vs_bf16"], x["w4a16_weight_gbps"], x["copy_gbps"], x["rel_err_vs_bf16_dequant"]]
            for x in r["rows"]
        ],
    )  # fmt: skip


TITLES = {
    "learner_full": ("(a) learner steps, full-parameter", _learner_md),
    "learner_lora_nvfp4": ("(a) learner steps, LoRA on an NVFP4 base", _learner_md),
    "triton_kernels": ("(b) te_ext Triton kernels vs the torch path", _kernels_md),
    "w4a16_gemm": ("(c) NVFP4 W4A16 GEMV/GEMM vs bf16", _gemm_md),
}


def report(out: Path, md: Path, js: Path, command: str) -> int:
    env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
    results = {}
    for name in STEPS:
        path = out / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else {"status": "did not run"}
    lines = [
        "# GPU check results",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
    ]
    for name, (title, render) in TITLES.items():
        r = results[name]
        lines += [f"## {title}", "", f"status: {r.get('status')} ({r.get('seconds', 0):.1f} s)", ""]
        lines += render(r) + [""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"environment": env, "steps": results}, indent=2))
    print(f"wrote {md} and {js}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run steps, one JSON each")
    p_run.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p_run.add_argument("--out", required=True, type=Path)
    p_rep = sub.add_parser("report", help="the Markdown tables and the JSON of the steps in --out")
    p_rep.add_argument("--out", required=True, type=Path)
    p_rep.add_argument("--md", required=True, type=Path)
    p_rep.add_argument("--json", required=True, type=Path)
    p_rep.add_argument("--command-line", default="bash bench/gpu_check.sh")
    p_list = sub.add_parser("list", help="the step names")
    del p_list
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(STEPS))
        return 0
    if args.command == "report":
        return report(args.out, args.md, args.json, args.command_line)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    return run(steps, args.out)


if __name__ == "__main__":
    sys.exit(main())
