"""QuRL invariant scaling: ``W·x = (W/s)·(s·x)``, applied once to the policy weights before RL.

The input columns of the linears that follow an RMSNorm are divided by s and the norm's weight is multiplied by s:

* ``qkv``: ``self_attn.{q,k,v}_proj.weight`` / s, ``input_layernorm.weight`` · s;
* ``gate_up``: ``mlp.{gate,up}_proj.weight`` / s, ``post_attention_layernorm.weight`` · s.

RMSNorm is ``g ⊙ x̂``, so the linear sees ``W (g ⊙ x̂) = (W/s)((s·g) ⊙ x̂)``: the function is unchanged (biases are
not touched: ``W(g⊙x̂) + b``). What changes is the ratio of the quantization grid to the optimizer's update: every
per-tensor/channel/block scale of a quantized weight follows its amax, so the grid of ``W/s`` is s times finer, while
Adam's step (about ``lr·sign(g)`` early on) does not depend on the weight's magnitude. The rollout engine's quantized
weights therefore move more per RL step. (In function space this is a learning rate s·lr for the scaled linears and
lr/s for the norm weights.)

It acts on full HF-named tensors, before the learner shards them, so it is the same for every TP/PP layout.
"""

from __future__ import annotations

import torch

INVARIANT_SCALING_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gate_up": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
}


def _layer_indices(hf_state_dict: dict[str, torch.Tensor]) -> list[int]:
    indices = set()
    for name in hf_state_dict:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            indices.add(int(parts[2]))
    return sorted(indices)


def apply_invariant_scaling(
    hf_state_dict: dict[str, torch.Tensor], s: float, targets: list[str] | tuple[str, ...] = ("qkv",)
) -> dict[str, torch.Tensor]:
    """A new state dict with the weights of ``targets`` divided by s and their preceding RMSNorm weight multiplied by s.

    Scaled tensors are computed and returned in float32; all other tensors are passed through unchanged (same
    objects). ``s == 1`` returns the tensors unchanged. Raises ValueError for ``s <= 0``, unknown or empty
    ``targets`` and missing tensors (named).
    """
    if not s > 0:
        raise ValueError(f"invariant scaling: s={s} must be > 0")
    targets = list(targets)
    unknown = [t for t in targets if t not in INVARIANT_SCALING_TARGETS]
    if not targets or unknown:
        raise ValueError(
            f"invariant scaling: targets={targets} must be a non-empty subset of {list(INVARIANT_SCALING_TARGETS)}"
        )
    out = dict(hf_state_dict)
    if s == 1:
        return out
    layers = _layer_indices(hf_state_dict)
    if not layers:
        raise ValueError("invariant scaling: no model.layers.{i}.* tensors in the state dict")
    needed = [
        (f"model.layers.{i}.{norm}.weight", [f"model.layers.{i}.{lin}.weight" for lin in linears])
        for target in dict.fromkeys(targets)
        for norm, linears in [INVARIANT_SCALING_TARGETS[target]]
        for i in layers
    ]
    missing = [n for norm, lins in needed for n in (norm, *lins) if n not in hf_state_dict]
    if missing:
        raise ValueError(f"invariant scaling: missing tensors {missing}")
    for norm, linears in needed:
        out[norm] = hf_state_dict[norm].float() * s
        for name in linears:
            out[name] = hf_state_dict[name].float() / s
    return out
