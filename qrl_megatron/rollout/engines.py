"""Which rollout engine runs, and the model folder it starts from.

A quantized engine must be *built* quantized (vLLM picks its linear kernels from the checkpoint's
``quantization_config``), so for ``rollout.quant != bf16`` the policy is exported once in that format with the
same bf16 exclusions as the bridge's plan; the first sync then replaces those weights with the learner's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qrl_megatron.bridge.transport import TcpOptions
from qrl_megatron.rollout.config import RolloutConfig
from qrl_megatron.rollout.engine import LoRAServing, RolloutEngine


def rollout_model_dir(rollout: RolloutConfig, run_dir: str | Path, policy_dir: str | Path, plan: Any | None) -> Path:
    """The folder the engine starts from: ``policy_dir`` (bf16), or its export in ``rollout.quant`` (every linear
    but ``lm_head`` and the plan's bf16 exclusions; QeRL mode has no plan: every linear but ``lm_head``)."""
    if rollout.quant == "bf16":
        return Path(policy_dir)
    from te_ext.vllm_export import export_quantized_checkpoint

    ignore = ["lm_head", *(plan.linear_modules(quantized=False) if plan is not None else [])]
    out = Path(run_dir) / f"rollout_model_{rollout.quant}"
    return export_quantized_checkpoint(policy_dir, out, rollout.quant, overwrite=True, ignore=ignore)


def make_engine(
    rollout: RolloutConfig,
    run_dir: str | Path,
    seed: int,
    policy_dir: str | Path,
    max_model_len: int,
    plan: Any | None = None,
    *,
    adapter: LoRAServing | None = None,
    model_dir: str | Path | None = None,
    transport: str = "shm",
    tcp: TcpOptions | None = None,
) -> RolloutEngine:
    """The engine ``rollout.engine`` names, started from ``policy_dir`` (exported first when quantized) or from
    ``model_dir`` (already in the rollout format); ``adapter``: QeRL mode, the LoRA adapter it serves;
    ``transport``: how weights reach it (a resolved ``sync.transport``, bridge/transport.resolve_transport; ``tcp``:
    the ``sync.tcp_*`` options)."""
    model_dir = str(model_dir or rollout_model_dir(rollout, run_dir, policy_dir, plan))
    if rollout.engines > 1:  # data-parallel rollout: N engines behind this one interface (rollout/pool.py)
        from qrl_megatron.rollout.pool import start_pool

        return start_pool(
            rollout,
            lambda member: make_engine(
                member, run_dir, seed, policy_dir, max_model_len, plan,
                adapter=adapter, model_dir=model_dir, transport=transport, tcp=tcp,
            ),
        )  # fmt: skip
    if rollout.engine == "server":
        from qrl_megatron.rollout.server_engine import VLLMServerEngine

        return VLLMServerEngine(
            model_dir,
            rollout,
            seed=seed,
            max_model_len=max_model_len,
            url=rollout.server_url,
            adapter=adapter,
            transport=transport,
            tcp=tcp,
        )
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, rollout, seed=seed, max_model_len=max_model_len, adapter=adapter, transport=transport)
