"""Weight sync v0: gather the full bf16 HF-named weights on rank 0 and reload them into the colocated engine."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist


class FullWeightSync:
    plan = None  # no resharding plan: full bf16 weights

    def __call__(self, learner: Any, engine: Any | None, step: int) -> dict[str, float]:
        start = time.perf_counter()
        weights = learner.gather_hf_weights(dtype=torch.bfloat16, dst=0)
        if dist.get_rank() != 0:
            return {}
        assert weights is not None and engine is not None
        engine.load_weights(weights)
        sent = float(sum(t.numel() * t.element_size() for t in weights.values()))
        seconds = time.perf_counter() - start
        return {"sync_seconds": seconds, "sync_bytes": sent, "sync_gbps": sent / max(seconds, 1e-9) / 1e9}
