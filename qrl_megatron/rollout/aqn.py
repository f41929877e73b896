"""QeRL Adaptive Quantization Noise (AQN): Gaussian noise on the rollout engine's RMSNorm weights.

QeRL (arXiv 2510.11696, Sec. 3.3) adds a channel-wise noise vector z ~ N(0, sigma^2 I) to the weight w of each
decoder layer's two RMSNorms: ``(w + z) * x / rms(x)`` feeding ``W`` equals ``w * x / rms(x)`` feeding
``W * diag(1 + z / w)``, i.e. row-wise multiplicative noise on the q/k/v (input_layernorm) and gate/up
(post_attention_layernorm) projections that read the normalized activations. The paper applies it to these
layers only (Fig. 6), so the final norm (which feeds the unquantized lm_head) is left clean.

The noise acts on vLLM's own ``RMSNorm`` modules, inside the engine (the public QeRL code matches Hugging Face
class names and never reaches vLLM's modules, so there it is a no-op). The learner keeps clean norms: every weight
sync re-streams them, and fresh noise is added afterwards for the next rollout, so rollout logprobs include it.

Precision note: the engine holds bf16 norm weights; ``w + z`` is rounded once to bf16 (spacing 2^-7 on [1, 2),
2^-8 on [0.5, 1)). For norm weights near 1 a perturbation below ~2e-3 mostly rounds away (QeRL's late stages,
sigma ~5e-4, barely change a bf16 weight of ~1); the engine reports the rms of the change it actually applied.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qrl_megatron.rollout.config import AQNConfig

# HF and vLLM share these module names (Llama/Qwen2 families): model.layers.<i>.{input,post_attention}_layernorm
AQN_NORM_PATTERN = re.compile(r"(?:^|\.)layers\.\d+\.(?:input_layernorm|post_attention_layernorm)$")


def aqn_stage(step: int, total_steps: int, stages: int) -> int:
    """Stage k in [0, K-1] of RL step ``step`` (1-based, the step whose rollout uses the noise).

    The RL steps are split into K stages of equal length: ``k = floor((step - 1) * K / total_steps)``, clamped to
    [0, K-1] (steps past ``total_steps`` stay in the last stage).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    return min(max((step - 1) * stages // total_steps, 0), stages - 1)


def aqn_sigma(step: int, total_steps: int, cfg: AQNConfig) -> float:
    """Noise std of the rollout of RL step ``step`` (1-based): 0 when AQN is off or in stage 0.

    With k = :func:`aqn_stage` and K = ``cfg.stages``:

    * k = 0: sigma = 0 (the first 1/K of training runs on the plain, quantization-only noise);
    * 1 <= k <= K-1, K >= 3: ``sigma = sigma_start * (sigma_end / sigma_start) ** ((k - 1) / (K - 2))``, so stage 1
      is sigma_start and stage K-1 is sigma_end (QeRL's schedule: K-1 geometric values over the K-1 noisy stages);
    * K = 2: the single noisy stage uses sigma_start.
    """
    if not cfg.enabled:
        return 0.0
    k = aqn_stage(step, total_steps, cfg.stages)
    if k == 0:
        return 0.0
    if cfg.stages == 2:
        return float(cfg.sigma_start)
    return float(cfg.sigma_start * (cfg.sigma_end / cfg.sigma_start) ** ((k - 1) / (cfg.stages - 2)))


def _hash_seed(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)


def noise_seed(seed: int, step: int) -> int:
    """The seed of the noise drawn for the rollout of ``step`` of a run seeded ``seed``."""
    return _hash_seed("aqn", seed, step)


def norm_noise(name: str, shape: tuple[int, ...] | torch.Size, sigma: float, seed: int) -> torch.Tensor:
    """float32 N(0, sigma^2) noise of one norm weight, drawn on CPU from (seed, module name).

    Keyed by the module's global name, so every engine rank (TP replicas, any PP split) and a reference model with
    the same names draw the same tensor.
    """
    generator = torch.Generator(device="cpu").manual_seed(_hash_seed(seed, name))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * sigma


def add_norm_noise(modules: Sequence[tuple[str, Any]], sigma: float, seed: int) -> dict[str, float]:
    """Add :func:`norm_noise` to each module's ``weight`` in place (rounded once to its dtype); change statistics."""
    count, changed, elements, sq_sum = 0, 0, 0, 0.0
    with torch.no_grad():
        for name, module in modules:
            weight: torch.Tensor = module.weight
            z = norm_noise(name, weight.shape, sigma, seed)
            before = weight.detach().float().cpu()
            noisy = (before + z).to(weight.dtype)
            weight.data.copy_(noisy.to(weight.device))  # in place: kernels and graphs keep their pointer
            delta = noisy.float() - before
            count += 1
            changed += int((delta != 0).sum())
            elements += delta.numel()
            sq_sum += float(delta.double().pow(2).sum())
    return {
        "norms": count,
        "sigma": float(sigma),
        "changed_fraction": changed / max(elements, 1),
        "applied_rms": (sq_sum / max(elements, 1)) ** 0.5,
    }


class AdaptiveQuantizationNoise:
    """Call right after the weight sync of ``step``: noise for the rollout of ``step + 1``; returns its sigma.

    ``engine`` is any rollout engine with ``add_norm_noise(sigma, seed)``. Sigma 0 (AQN off, stage 0, or no
    rollout left) makes no engine call: the sync just restored the clean norms.
    """

    def __init__(self, cfg: AQNConfig, total_steps: int, seed: int) -> None:
        self.cfg, self.total_steps, self.seed = cfg, total_steps, seed

    def __call__(self, engine: Any, step: int) -> float:
        rollout_step = step + 1
        if not self.cfg.enabled or rollout_step > self.total_steps:
            return 0.0
        sigma = aqn_sigma(rollout_step, self.total_steps, self.cfg)
        if sigma == 0.0:
            return 0.0
        report = engine.add_norm_noise(sigma, noise_seed(self.seed, rollout_step))
        if not report.get("norms"):
            raise RuntimeError(
                "AQN found no decoder-layer RMSNorm (layers.<i>.input_layernorm / post_attention_layernorm) in the "
                "rollout engine; this model family needs its norm names added to AQN_NORM_PATTERN"
            )
        return sigma
