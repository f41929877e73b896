"""The weight-sync interface between the learner and the rollout engine(s).

A sync runs on every learner rank after each optimizer step (they all take part in gathering shards) and returns
its metrics on the rank that drives the engine. ``make_weight_sync`` picks the implementation from ``sync.method``:
the resharding bridge (plan -> execute -> transport -> verify) or the bf16 full-gather v0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from qrl_megatron.config import QRLConfig


class WeightSync(Protocol):
    def __call__(self, learner: Any, engine: Any | None, step: int) -> dict[str, float]: ...


def rollout_target(cfg: QRLConfig) -> Any:
    from qrl_megatron.bridge.plan import RolloutTarget

    return RolloutTarget(
        fmt=cfg.rollout.quant,
        engine_tp=cfg.rollout.tp,
        exclude=tuple(cfg.sync.exclude),
        bucket_bytes=max(1, int(cfg.sync.bucket_mib * 2**20)),
    )


def make_weight_sync(
    cfg: QRLConfig, spec: Any, model_dir: str | Path, probe_sequences: Sequence[Sequence[int]], is_dst: bool
) -> WeightSync:
    if cfg.sync.method == "full":
        from qrl_megatron.bridge.full_sync import FullWeightSync

        return FullWeightSync()
    from qrl_megatron.bridge.plan import build_plan
    from qrl_megatron.bridge.sync import BridgeWeightSync, LogprobProbe

    plan = build_plan(spec, cfg.learner.tp, cfg.learner.pp, cfg.learner.dp, rollout_target(cfg))
    probe = LogprobProbe(model_dir, probe_sequences) if is_dst and cfg.sync.probe_every > 0 else None
    return BridgeWeightSync(
        plan,
        verify_checksums=cfg.sync.verify_checksums,
        probe=probe,
        probe_every=cfg.sync.probe_every,
        probe_tolerance=cfg.sync.probe_tolerance,
    )
