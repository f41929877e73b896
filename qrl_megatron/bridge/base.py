"""The weight-sync interface between the learner and the rollout engine(s).

A sync runs on every learner rank after each optimizer step (they all take part in gathering shards) and returns
its metrics on every rank. The resharding bridge (plan -> execute -> transport -> verify) implements the same
interface; `make_weight_sync` picks the implementation from `sync.method`.
"""

from __future__ import annotations

from typing import Any, Protocol

from qrl_megatron.config import SyncConfig


class WeightSync(Protocol):
    def __call__(self, learner: Any, engine: Any | None, step: int) -> dict[str, float]: ...


def make_weight_sync(cfg: SyncConfig) -> WeightSync:
    if cfg.method == "full":
        from qrl_megatron.bridge.full_sync import FullWeightSync

        return FullWeightSync()
    raise ValueError(f"sync.method={cfg.method!r} has no implementation")
