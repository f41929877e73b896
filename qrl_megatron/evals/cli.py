"""`qrl-eval MODEL_DIR_OR_RUN [--config YAML] [--task NAME] [key=value ...]`: evaluate a model on held-out sets.

The same code as the trainer's evaluation (`qrl_megatron.evals.run`), the same task loader and verifier, and the
vLLM engine in any `rollout.quant` format (a quantized engine is built from an exported copy, as in training).
MODEL_DIR_OR_RUN is an HF folder (config.json + safetensors) or a run folder of `qrl-train`: then the run's own
config.json is the base config and its exported `final/` folder the model. Results: a table on stdout and JSON
(`--out`, default `<run>/qrl_eval.json` for a run, `./qrl_eval.json` otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from qrl_megatron.config import ConfigError, QRLConfig, load_config

EXIT_CONFIG_ERROR = 2


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve(target: str, config: str | None, overrides: list[str]) -> tuple[Path, QRLConfig, Path]:
    """(model folder, config, default output file) for `target`."""
    path = Path(target)
    if not path.is_dir():
        raise ConfigError(f"{target!r} is not a folder; give an HF model folder or a qrl-train run folder")
    run_config = path / "config.json"
    is_run = run_config.is_file() and "task" in json.loads(run_config.read_text())
    if is_run:
        model = path / "final"
        if not _is_hf_folder(model):
            raise ConfigError(
                f"run {target!r} has no exported model in final/ (config.json + *.safetensors); export it with "
                "qrl-export, or give the HF folder itself"
            )
        # the run's config.json is JSON, which is YAML: its settings are the base, --config/overrides go on top
        cfg = load_config(config or run_config, overrides)
        return model, cfg, path / "qrl_eval.json"
    if not _is_hf_folder(path):
        raise ConfigError(f"{target!r} holds no config.json + *.safetensors (an HF model folder) nor a run config")
    return path, load_config(config, overrides), Path("qrl_eval.json")


def evaluate_model(model_dir: Path, cfg: QRLConfig) -> dict[str, Any]:
    """Every held-out set of `cfg.task` on an engine started from `model_dir`."""
    from qrl_megatron.data.loader import eval_sets, load_task
    from qrl_megatron.evals.run import evaluate_set
    from qrl_megatron.models.base import load_tokenizer
    from qrl_megatron.rewards import MATH_VERIFIER
    from qrl_megatron.rewards.scorer import RewardScorer, verifier_name
    from qrl_megatron.rollout.engines import make_engine

    max_positions = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 4096))
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    tokenizer = load_tokenizer(model_dir)
    task = load_task(
        cfg.task,
        cfg.seed,
        tokenizer,
        max_prompt_tokens=max_positions - max_new,
        check_answers=verifier_name(cfg.reward, cfg.task.name) == MATH_VERIFIER,
        workers=cfg.reward.workers,
    )
    sets = eval_sets(task)
    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for ds in sets.values() for p in ds["prompt"])
    max_model_len = min(-(-(longest + max_new) // 8) * 8, max_positions)
    scorer = RewardScorer(cfg.reward, cfg.task.name)
    with tempfile.TemporaryDirectory(prefix="qrl-eval-") as scratch:  # a quantized engine's exported copy
        engine = make_engine(cfg.rollout, scratch, cfg.seed, model_dir, max_model_len)
        try:
            results = {
                name: evaluate_set(engine, scorer, list(ds["prompt"]), list(ds["answer"]), cfg.eval, max_new)
                for name, ds in sets.items()
            }
        finally:
            engine.close()
            scorer.close()
    return {"model": str(model_dir), "rollout_quant": cfg.rollout.quant, "data": task.report, "sets": results}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrl-eval",
        description="Evaluate an HF model folder or a qrl-train run: greedy accuracy, pass@k and mean@k per set.",
        epilog="example: qrl-eval runs/gsm8k --task gsm8k task.dataset=openai/gsm8k task.dataset_config=main "
        "'eval.k=[1,8]' rollout.quant=nvfp4",
    )
    parser.add_argument("model", help="HF model folder, or a qrl-train run folder (its config and final/ model)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (task.*, eval.*, reward.*, rollout.*)")
    parser.add_argument("--config", help="YAML recipe to start from (default: the run's config, else the defaults)")
    parser.add_argument("--task", help="shorthand for task.name=NAME")
    parser.add_argument("--out", help="JSON results file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    overrides = ([f"task.name={args.task}"] if args.task else []) + list(args.overrides)
    given = {item.split("=", 1)[0] for item in overrides}
    if "task.eval_files" in given and not given & {"task.data_files", "task.dataset"}:
        # evaluation needs no training split: the held-out file stands in for it
        overrides.append(
            "task.data_files=" + next(o for o in overrides if o.startswith("task.eval_files=")).split("=", 1)[1]
        )
    try:
        model_dir, cfg, default_out = resolve(args.model, args.config, overrides)
        result = evaluate_model(model_dir, cfg)
    except ConfigError as err:
        print(f"qrl-eval: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    out = Path(args.out) if args.out else default_out
    out.write_text(json.dumps(result, indent=2))
    for name, values in result["sets"].items():
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"{name}: {shown}")
    print(f"qrl-eval: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
