"""Quantized-rollout ablation on the default tiny task: which correction / trick recovers what quantization costs.

Arms (each with 3 seeds by default): bf16 rollout; FP8; INT8; NVFP4 naive; NVFP4 + TIS; NVFP4 + QuRL ACR;
NVFP4 + ACR + invariant scaling; NVFP4 + QeRL AQN; and QeRL mode (LoRA on a frozen base): ``lora-bf16``,
``lora-nvfp4`` (learner and engine hold the same NVFP4 codes), ``lora-nvfp4-aqn``. Every run is a real ``qrl-train`` (Megatron learner, vLLM-CPU
engine in the arm's format, the resharding bridge) on ``configs/tiny_cpu.yaml`` shortened by ``BASE`` below so the
whole ablation takes about an hour on 2 cores.

Resumable: a run whose ``eval.json`` exists is kept and skipped, so re-running the command after an interruption
finishes the rest. At the end every run's final *full-precision* policy (the HF folder ``final/``) is also
evaluated greedily on one bf16 engine, next to the quantized engine's own accuracy, and the report is written:
``docs/results/ablation.md`` (table), ``docs/results/ablation.png`` (reward and mismatch curves) and
``docs/results/ablation.json``.

    .venv/bin/python bench/ablation.py                 # everything (resumes)
    .venv/bin/python bench/ablation.py --seeds 0 --arms bf16,nvfp4_acr   # a subset
    .venv/bin/python bench/ablation.py --report-only   # rebuild the report from finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qrl_megatron.metrics.logger import read_metrics  # noqa: E402
from qrl_megatron.metrics.plot import moving_mean  # noqa: E402

BASE = [
    "trainer.max_steps=80",
    "trainer.max_time_s=150",
    "trainer.checkpoint=false",
    "rollout.prompts_per_step=32",
    "learner.micro_batch_size=64",
    "sync.probe_every=20",
    "run.progress=false",
    "run.on_existing=error",
]
NO_SCALING = "algo.invariant_scaling.s=1"
# QeRL mode: rank-16 LoRA on a frozen base (configs/tiny_cpu_qerl.yaml's adapter and learning rate)
LORA = ["learner.lora.rank=16", "learner.lora.alpha=32", "learner.lr=1e-3"]
ARMS: dict[str, tuple[str, list[str]]] = {
    "bf16": ("bf16 rollout", ["rollout.quant=bf16"]),
    "fp8": ("FP8 (W8A8)", ["rollout.quant=fp8", NO_SCALING]),
    "int8": ("INT8 (W8A8)", ["rollout.quant=int8", NO_SCALING]),
    "nvfp4": ("NVFP4 naive", ["rollout.quant=nvfp4", NO_SCALING]),
    "nvfp4_tis": ("NVFP4 + TIS", ["rollout.quant=nvfp4", NO_SCALING, "algo.correction=tis"]),
    "nvfp4_acr": ("NVFP4 + ACR", ["rollout.quant=nvfp4", NO_SCALING, "algo.correction=acr"]),
    "nvfp4_acr_is": ("NVFP4 + ACR + inv. scaling", ["rollout.quant=nvfp4", "algo.correction=acr", "algo.invariant_scaling.s=1.5"]),
    "nvfp4_aqn": ("NVFP4 + AQN", ["rollout.quant=nvfp4", NO_SCALING, "algo.aqn.enabled=true"]),
    "lora-bf16": ("LoRA, bf16 base", [*LORA, "learner.base_format=bf16", "rollout.quant=bf16"]),
    "lora-nvfp4": ("LoRA, NVFP4 base (QeRL)", [*LORA, "learner.base_format=nvfp4", "rollout.quant=nvfp4"]),
    "lora-nvfp4-aqn": ("LoRA, NVFP4 base + AQN", [*LORA, "learner.base_format=nvfp4", "rollout.quant=nvfp4", "algo.aqn.enabled=true"]),
}  # fmt: skip


def run_one(arm: str, seed: int, root: Path, extra: list[str]) -> Path:
    run_dir = root / f"{arm}-seed{seed}"
    if (run_dir / "eval.json").is_file():
        return run_dir
    if run_dir.exists():  # an interrupted run: start it again from scratch
        import shutil

        shutil.rmtree(run_dir)
    cmd = [
        str(Path(sys.executable).parent / "qrl-train"),
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        *BASE,
        *ARMS[arm][1],
        *extra,
        f"seed={seed}",
        f"run.dir={run_dir}",
    ]
    start = time.perf_counter()
    log = root / f"{arm}-seed{seed}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (rc={rc}); see {log}")
    print(f"  {arm} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def evaluate_full_precision(run_dirs: list[Path]) -> dict[str, float]:
    """Greedy held-out accuracy of every run's final full-precision policy, on one bf16 engine."""
    import torch

    from qrl_megatron.config import load_config
    from qrl_megatron.data.arithmetic import load_task
    from qrl_megatron.models.base import load_hf_weights, prepare_base_model
    from qrl_megatron.rollout.stage import evaluate
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    todo = [d for d in run_dirs if (d / "final" / "config.json").is_file()]
    if not todo:
        return {}
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [])
    base = prepare_base_model(cfg.model, cfg.run.cache_dir)
    engine = VLLMEngine(str(base), cfg.rollout, seed=0, max_model_len=64)
    out = {}
    try:
        for run_dir in todo:
            run_cfg = json.loads((run_dir / "config.json").read_text())
            task = load_task(
                load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"seed={run_cfg['seed']}"]).task, run_cfg["seed"]
            )
            engine.load_weights({k: v.to(torch.bfloat16) for k, v in load_hf_weights(run_dir / "final").items()})
            result = evaluate(
                engine, list(task["eval"]["prompt"]), list(task["eval"]["answer"]), cfg.rollout.max_new_tokens
            )
            out[run_dir.name] = result["accuracy"]
    finally:
        engine.close()
    return out


def report(root: Path, arms: list[str], seeds: list[int], out_dir: Path) -> None:
    cache = root / "full_precision_eval.json"
    fp = json.loads(cache.read_text()) if cache.is_file() else {}
    finished = [root / f"{a}-seed{s}" for a in arms for s in seeds if (root / f"{a}-seed{s}" / "eval.json").is_file()]
    missing = [d for d in finished if d.name not in fp]
    if missing:
        fp.update(evaluate_full_precision(missing))
        cache.write_text(json.dumps(fp, indent=2))

    table, curves = [], {}
    for arm in arms:
        evals, rows_by_seed = [], []
        for seed in seeds:
            d = root / f"{arm}-seed{seed}"
            if (d / "eval.json").is_file():
                evals.append((json.loads((d / "eval.json").read_text()), fp.get(d.name)))
                rows_by_seed.append(_rows(d))
        if not evals:
            continue

        def stat(values: list[float]) -> tuple[float, float]:
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        rows = [r for rs in rows_by_seed for r in rs]
        table.append(
            {
                "arm": arm,
                "label": ARMS[arm][0],
                "seeds": len(evals),
                "engine_before": stat([e["before"]["accuracy"] for e, _ in evals]),
                "engine_after": stat([e["after"]["accuracy"] for e, _ in evals]),
                "full_precision_after": stat([a for _, a in evals if a is not None])
                if any(a is not None for _, a in evals)
                else None,
                "mismatch_kl": statistics.mean(r.get("mismatch_kl", 0.0) for r in rows),
                "logprob_gap": statistics.mean(r.get("logprob_diff_abs_mean", 0.0) for r in rows),
                "tokens_per_s": statistics.mean(r.get("rollout_tokens_per_s", 0.0) for r in rows),
                "sync_mb": statistics.mean(r.get("sync_bytes", 0.0) for r in rows) / 1e6,
                "steps": statistics.mean(e["steps"] for e, _ in evals),
            }
        )
        steps = min(len(rs) for rs in rows_by_seed)
        curves[arm] = {
            key: [statistics.mean(rs[i].get(key, 0.0) for rs in rows_by_seed) for i in range(steps)]
            for key in ("reward_mean", "mismatch_kl")
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(
        json.dumps({"base": BASE, "arms": {a: ARMS[a][1] for a in arms}, "table": table, "curves": curves}, indent=2)
    )
    _plot(curves, out_dir / "ablation.png")
    header = "| arm | seeds | engine acc. before | engine acc. after | full-precision acc. after | mismatch KL | mean \\|Δlogp\\| | rollout tok/s | sync MB |"
    lines = [header, "|" + "---|" * 9]
    for r in table:
        fpa = r["full_precision_after"]
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['engine_before'][0]:.3f} ± {r['engine_before'][1]:.3f} | "
            f"{r['engine_after'][0]:.3f} ± {r['engine_after'][1]:.3f} | "
            + (f"{fpa[0]:.3f} ± {fpa[1]:.3f}" if fpa else "–")
            + f" | {r['mismatch_kl']:.4f} | {r['logprob_gap']:.4f} | {r['tokens_per_s']:.0f} | {r['sync_mb']:.2f} |"
        )
    (out_dir / "ablation_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, c in curves.items():
        for ax, key in zip(axes, ("reward_mean", "mismatch_kl"), strict=True):
            smooth = moving_mean(c[key], 5)
            ax.plot(range(1, len(smooth) + 1), smooth, label=ARMS[arm][0])
    axes[0].set(title="sampled reward (5-step mean, seed-averaged)", xlabel="RL step", ylabel="reward")
    axes[1].set(
        title="mismatch KL(π_learner ‖ π_engine) on sampled tokens", xlabel="RL step", ylabel="KL (nats)", yscale="log"
    )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--override", action="append", default=[], help="extra config override for every run")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QRL_QUIET", "1")
    if not args.report_only:
        start = time.perf_counter()
        # seed-major order: an interrupted ablation still has every arm for the first seeds
        for seed in seeds:
            for arm in arms:
                run_one(arm, seed, root, args.override)
        print(f"ablation runs done in {time.perf_counter() - start:.0f} s", flush=True)
    report(root, arms, seeds, Path(args.out))


if __name__ == "__main__":
    main()
