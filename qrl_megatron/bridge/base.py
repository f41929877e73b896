"""The weight-sync interface between the learner and the rollout engine(s).

A sync runs on every learner rank after each optimizer step (they all take part in gathering shards) and returns
its metrics on the rank that drives the engine. ``make_weight_sync`` picks the implementation from ``sync.method``:
the resharding bridge (plan -> execute -> transport -> verify) or the bf16 full-gather v0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from qrl_megatron.bridge.config import SyncConfig


class WeightSync(Protocol):
    plan: Any  # the bridge's SyncPlan (its bf16 exclusions shape the quantized rollout checkpoint), or None

    def __call__(self, learner: Any, engine: Any | None, step: int) -> dict[str, float]: ...


def rollout_target(sync: SyncConfig, rollout_format: str, engine_tp: int) -> Any:
    """What the bridge streams to: the engine's weight format (``rollout.quant``) and TP size (``rollout.tp``)."""
    from qrl_megatron.bridge.plan import RolloutTarget

    return RolloutTarget(
        fmt=rollout_format,
        engine_tp=engine_tp,
        exclude=tuple(sync.exclude),
        bucket_bytes=max(1, int(sync.bucket_mib * 2**20)),
    )


def make_weight_sync(
    sync: SyncConfig,
    spec: Any,
    probe_sequences: Sequence[Sequence[int]],
    *,
    learner_parallel: tuple[int, int, int],
    rollout_format: str,
    engine_tp: int,
    adapter: Any | None = None,
    send_norms: bool = False,
) -> WeightSync:
    """The sync ``sync.method`` names, from a learner at ``learner_parallel`` = (tp, pp, dp) to an engine holding
    ``rollout_format`` weights at TP ``engine_tp``. Every learner rank builds it (the probe's learner forward is a
    collective of them all); rank 0 drives the engine.

    ``adapter`` (an :class:`~qrl_megatron.lora.adapter.AdapterSpec`, QeRL mode): only the adapter streams
    (:class:`~qrl_megatron.bridge.adapter_sync.AdapterSync`), with the norms too when ``send_norms`` (AQN noise on
    the engine's norms) or when they train. In both modes the probe compares the engine with the learner's own
    forward (full-parameter: with each parameter swapped for the engine's copy of it while its module runs)."""
    from te_ext.formats import format_descriptor

    if adapter is not None:
        from qrl_megatron.bridge.adapter_sync import AdapterSync

        return AdapterSync(
            spec,
            adapter,
            probe_sequences,
            probe_every=sync.probe_every,
            # the engine (bf16 compute) against the learner's fp32 forward of the same codes + adapter: measured on
            # the tiny QeRL recipe 0.016-0.047 nats mean when healthy, 0.30 for an engine serving a stale adapter
            # (docs/qerl.md); the format's tolerance sits between them
            probe_tolerance=sync.probe_tolerance or format_descriptor(rollout_format).probe_tolerance,
            send_norms=send_norms,
            verify_checksums=sync.verify_checksums,
        )
    if sync.method == "full":
        from qrl_megatron.bridge.full_sync import FullWeightSync

        return FullWeightSync()
    from qrl_megatron.bridge.plan import build_plan
    from qrl_megatron.bridge.sync import BridgeWeightSync, LogprobProbe

    tp, pp, dp = learner_parallel
    plan = build_plan(spec, tp, pp, dp, rollout_target(sync, rollout_format, engine_tp))
    probe = LogprobProbe(plan, probe_sequences) if sync.probe_every > 0 else None
    return BridgeWeightSync(
        plan,
        verify_checksums=sync.verify_checksums,
        probe=probe,
        probe_every=sync.probe_every,
        probe_tolerance=sync.probe_tolerance or format_descriptor(rollout_format).probe_tolerance,
    )
