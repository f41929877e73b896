"""Which rollout engine runs, and the model folder it starts from.

A quantized engine must be *built* quantized (vLLM picks its linear kernels from the checkpoint's
``quantization_config``), so for ``rollout.quant != bf16`` the policy is exported once in that format with the
same bf16 exclusions as the bridge's plan; the first sync then replaces those weights with the learner's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qrl_megatron.config import QRLConfig


def rollout_model_dir(cfg: QRLConfig, policy_dir: str | Path, plan: Any | None) -> Path:
    if cfg.rollout.quant == "bf16":
        return Path(policy_dir)
    from te_ext.vllm_export import export_quantized_checkpoint

    ignore = ["lm_head", *(plan.linear_modules(quantized=False) if plan is not None else [])]
    out = Path(cfg.run.dir) / f"rollout_model_{cfg.rollout.quant}"
    return export_quantized_checkpoint(policy_dir, out, cfg.rollout.quant, overwrite=True, ignore=ignore)


def make_engine(cfg: QRLConfig, policy_dir: str | Path, max_model_len: int, plan: Any | None = None) -> Any:
    model_dir = str(rollout_model_dir(cfg, policy_dir, plan))
    if cfg.rollout.engine == "server":
        from qrl_megatron.rollout.server_engine import VLLMServerEngine

        return VLLMServerEngine(
            model_dir, cfg.rollout, seed=cfg.seed, max_model_len=max_model_len, url=cfg.rollout.server_url
        )
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, cfg.rollout, seed=cfg.seed, max_model_len=max_model_len)
