"""Exact Hugging Face <-> Megatron-core weight mapping for Qwen2/Qwen3/Llama, and TP/PP sharding rules.

Everything here works on FULL (unsharded) tensors with GLOBAL layer numbering; the TP helpers split and join
them by parameter name, so the learner's loader/gatherer and the resharding bridge share one set of rules.

Megatron GPTModel names (local spec; the Transformer Engine spec fuses the norms into the next linear, see
:func:`to_te_norm_names`)::

    embedding.word_embeddings.weight                        [V, H]            vocab-parallel (dim 0)
    decoder.layers.{i}.input_layernorm.weight               [H]               replicated
    decoder.layers.{i}.self_attention.linear_qkv.weight     [(nh+2*ng)*d, H]  column-parallel, per query group
    decoder.layers.{i}.self_attention.linear_qkv.bias       [(nh+2*ng)*d]     (Qwen2 only)
    decoder.layers.{i}.self_attention.linear_proj.weight    [H, nh*d]         row-parallel (dim 1)
    decoder.layers.{i}.self_attention.q_layernorm.weight    [d]               replicated (Qwen3 only)
    decoder.layers.{i}.self_attention.k_layernorm.weight    [d]               replicated (Qwen3 only)
    decoder.layers.{i}.pre_mlp_layernorm.weight             [H]               replicated
    decoder.layers.{i}.mlp.linear_fc1.weight                [2*F, H]          [gate; up], each column-parallel
    decoder.layers.{i}.mlp.linear_fc2.weight                [H, F]            row-parallel (dim 1)
    decoder.final_layernorm.weight                          [H]               replicated
    output_layer.weight                                     [V, H]            vocab-parallel; absent if tied

The fused QKV is grouped by query group g = 0..ng-1: ``[q heads of group g (nh/ng of them), k_g, v_g]``.
Qwen3's q/k norms (HF ``self_attn.q_norm`` / ``k_norm``) act on each head with one shared ``[d]`` weight, so every
TP rank holds the whole weight (megatron sums their gradients over TP in ``finalize_model_grads``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from qrl_megatron.models.registry import ModelSpec

__all__ = [
    "hf_to_megatron",
    "megatron_param_shapes",
    "megatron_param_to_hf",
    "megatron_to_hf",
    "megatron_layer_index",
    "pp_layer_offset",
    "shard_for_tp",
    "to_local_spec_norm_name",
    "to_local_spec_norm_names",
    "to_te_norm_name",
    "to_te_norm_names",
    "tp_split_kind",
    "unshard_from_tp",
    "with_layer_index",
]

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer HF suffix -> Megatron suffix for the 1:1 (non-fused) tensors.
_HF_TO_MG_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",  # Qwen3
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",  # Qwen3
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_MG_TO_HF_SIMPLE = {v: k for k, v in _HF_TO_MG_SIMPLE.items()}
# Megatron names used by the Transformer Engine layer spec (norm fused into the following linear).
_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_TE_NORMS_INV = {v: k for k, v in _TE_NORMS.items()}
# Buffers some older checkpoints carry; recomputed by both sides, so dropped.
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Canonical order of per-layer HF tensors (output ordering of megatron_to_hf).
_HF_LAYER_ORDER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------


def megatron_layer_index(name: str) -> tuple[int | None, str]:
    """``"decoder.layers.3.mlp.linear_fc1.weight"`` -> ``(3, "mlp.linear_fc1.weight")``; non-layer: ``(None, name)``."""
    m = _MG_LAYER.match(name)
    if m is None:
        return None, name
    return int(m.group(1)), m.group(2)


def with_layer_index(name: str, index: int) -> str:
    """Replace the layer number of a ``decoder.layers.{i}...`` name."""
    i, rest = megatron_layer_index(name)
    if i is None:
        raise ValueError(f"{name!r} is not a decoder layer parameter")
    return f"decoder.layers.{index}.{rest}"


def pp_layer_offset(pp_rank: int, num_layers: int, pp_size: int) -> int:
    """Global index of the first decoder layer on pipeline stage ``pp_rank`` (even split, no virtual stages)."""
    if num_layers % pp_size != 0:
        raise ValueError(f"learner.pp = {pp_size} must divide the model's num_layers = {num_layers}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} out of range for pp_size {pp_size}")
    return pp_rank * (num_layers // pp_size)


def to_te_norm_name(name: str) -> str:
    """Local-spec name -> Transformer Engine spec name (norm weights live on the fused linear); others unchanged."""
    i, rest = megatron_layer_index(name)
    return f"decoder.layers.{i}.{_TE_NORMS[rest]}" if i is not None and rest in _TE_NORMS else name


def to_local_spec_norm_name(name: str) -> str:
    """Inverse of :func:`to_te_norm_name` (no-op on names already in local-spec form)."""
    i, rest = megatron_layer_index(name)
    return f"decoder.layers.{i}.{_TE_NORMS_INV[rest]}" if i is not None and rest in _TE_NORMS_INV else name


def to_te_norm_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`to_te_norm_name` applied to every key."""
    return {to_te_norm_name(k): v for k, v in state_dict.items()}


def to_local_spec_norm_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`to_local_spec_norm_name` applied to every key."""
    return {to_local_spec_norm_name(k): v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------
# QKV / fc1 fusion
# ----------------------------------------------------------------------------------------------------------------


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    ng, d = spec.num_query_groups, spec.kv_channels
    tail = q.shape[1:]  # (H,) for weights, () for biases
    q = q.reshape(ng, spec.heads_per_group * d, *tail)
    k = k.reshape(ng, d, *tail)
    v = v.reshape(ng, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, d, hpg = spec.num_query_groups, spec.kv_channels, spec.heads_per_group
    tail = qkv.shape[1:]
    grouped = qkv.reshape(ng, (hpg + 2) * d, *tail)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the model spec, expected {shape}")


def _hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, d, f = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    nh, ng = spec.num_attention_heads, spec.num_query_groups
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nh * d, h),
        "self_attn.k_proj.weight": (ng * d, h),
        "self_attn.v_proj.weight": (ng * d, h),
        "self_attn.o_proj.weight": (h, nh * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if spec.qkv_bias:
        shapes.update(
            {"self_attn.q_proj.bias": (nh * d,), "self_attn.k_proj.bias": (ng * d,), "self_attn.v_proj.bias": (ng * d,)}
        )
    if spec.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# HF <-> Megatron (full tensors)
# ----------------------------------------------------------------------------------------------------------------


def hf_to_megatron(hf_state_dict: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """HF Qwen2/Qwen3/Llama state dict -> Megatron GPTModel state dict (local-spec names, full tensors, global layers).

    Strict: every expected HF tensor must be present with the right shape, and any unknown key is an error.
    With tied embeddings an ``lm_head.weight`` entry (as ``model.state_dict()`` reports it) must equal the
    embedding and is dropped.
    """
    expected_layer = _hf_shapes(spec)
    v, h = spec.vocab_size, spec.hidden_size
    layers: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(spec.num_layers)}
    top: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, t in hf_state_dict.items():
        if _IGNORED_HF.search(name):
            continue
        m = _HF_LAYER.match(name)
        if m is not None:
            i, rest = int(m.group(1)), m.group(2)
            if i >= spec.num_layers or rest not in expected_layer:
                unexpected.append(name)
                continue
            _check_shape(name, t, expected_layer[rest])
            layers[i][rest] = t
        elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            top[name] = t
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"unexpected HF tensors for {spec.arch}: {sorted(unexpected)}")

    missing = [f"model.layers.{i}.{k}" for i in range(spec.num_layers) for k in expected_layer if k not in layers[i]]
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in top:
            missing.append(name)
    if not spec.tie_word_embeddings and "lm_head.weight" not in top:
        missing.append("lm_head.weight")
    if missing:
        raise ValueError(f"missing HF tensors: {missing}")

    _check_shape("model.embed_tokens.weight", top["model.embed_tokens.weight"], (v, h))
    _check_shape("model.norm.weight", top["model.norm.weight"], (h,))
    if "lm_head.weight" in top:
        _check_shape("lm_head.weight", top["lm_head.weight"], (v, h))
        if spec.tie_word_embeddings and not torch.equal(top["lm_head.weight"], top["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")

    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": top["model.embed_tokens.weight"]}
    for i in range(spec.num_layers):
        src = layers[i]
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = src["input_layernorm.weight"]
        out[p + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            src["self_attn.q_proj.weight"], src["self_attn.k_proj.weight"], src["self_attn.v_proj.weight"], spec
        )
        if spec.qkv_bias:
            out[p + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                src["self_attn.q_proj.bias"], src["self_attn.k_proj.bias"], src["self_attn.v_proj.bias"], spec
            )
        out[p + "self_attention.linear_proj.weight"] = src["self_attn.o_proj.weight"]
        if spec.qk_norm:
            out[p + "self_attention.q_layernorm.weight"] = src["self_attn.q_norm.weight"]
            out[p + "self_attention.k_layernorm.weight"] = src["self_attn.k_norm.weight"]
        out[p + "pre_mlp_layernorm.weight"] = src["post_attention_layernorm.weight"]
        out[p + "mlp.linear_fc1.weight"] = torch.cat([src["mlp.gate_proj.weight"], src["mlp.up_proj.weight"]], dim=0)
        out[p + "mlp.linear_fc2.weight"] = src["mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = top["model.norm.weight"]
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = top["lm_head.weight"]
    return out


def megatron_to_hf(megatron_state_dict: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`hf_to_megatron` (local- or TE-spec norm names accepted).

    Output keys are in a canonical order (embedding, layers 0..L-1, final norm, lm_head). With tied embeddings
    an ``output_layer.weight`` entry (the last stage's copy under PP > 1) is dropped; no ``lm_head.weight`` is
    produced (HF checkpoints of tied models do not store it).
    """
    sd = to_local_spec_norm_names(megatron_state_dict)
    per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(spec.num_layers)}
    top: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    layer_keys = {
        "input_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    }
    if spec.qkv_bias:
        layer_keys.add("self_attention.linear_qkv.bias")
    if spec.qk_norm:
        layer_keys |= {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    for name, t in sd.items():
        if name.endswith("._extra_state"):
            continue
        i, rest = megatron_layer_index(name)
        if i is not None:
            if i >= spec.num_layers or rest not in layer_keys:
                unexpected.append(name)
            else:
                per_layer[i][rest] = t
        elif name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"):
            top[name] = t
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"unexpected Megatron tensors: {sorted(unexpected)}")
    missing = [f"decoder.layers.{i}.{k}" for i in range(spec.num_layers) for k in layer_keys if k not in per_layer[i]]
    needed_top = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not spec.tie_word_embeddings:
        needed_top.append("output_layer.weight")
    missing += [k for k in needed_top if k not in top]
    if missing:
        raise ValueError(f"missing Megatron tensors: {missing}")

    f = spec.ffn_hidden_size
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": top["embedding.word_embeddings.weight"]}
    for i in range(spec.num_layers):
        src = per_layer[i]
        q, k, v = _split_qkv(src["self_attention.linear_qkv.weight"], spec)
        layer = {
            "input_layernorm.weight": src["input_layernorm.weight"],
            "self_attn.q_proj.weight": q,
            "self_attn.k_proj.weight": k,
            "self_attn.v_proj.weight": v,
            "self_attn.o_proj.weight": src["self_attention.linear_proj.weight"],
            "post_attention_layernorm.weight": src["pre_mlp_layernorm.weight"],
            "mlp.down_proj.weight": src["mlp.linear_fc2.weight"],
        }
        if spec.qk_norm:
            layer["self_attn.q_norm.weight"] = src["self_attention.q_layernorm.weight"]
            layer["self_attn.k_norm.weight"] = src["self_attention.k_layernorm.weight"]
        fc1 = src["mlp.linear_fc1.weight"]
        if fc1.shape[0] != 2 * f:
            raise ValueError(f"decoder.layers.{i}.mlp.linear_fc1.weight: dim 0 is {fc1.shape[0]}, expected {2 * f}")
        layer["mlp.gate_proj.weight"], layer["mlp.up_proj.weight"] = fc1[:f], fc1[f:]
        if spec.qkv_bias:
            qb, kb, vb = _split_qkv(src["self_attention.linear_qkv.bias"], spec)
            layer.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb})
        for key in _HF_LAYER_ORDER:
            if key in layer:
                out[f"model.layers.{i}.{key}"] = layer[key]
    out["model.norm.weight"] = top["decoder.final_layernorm.weight"]
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = top["output_layer.weight"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tensor-parallel sharding rules (driven by the Megatron name)
# ----------------------------------------------------------------------------------------------------------------

# Kinds: "vocab" (dim 0, vocab-parallel), "column" (dim 0), "qkv" (dim 0 in whole query groups),
# "fc1" (gate and up halves each split on dim 0), "row" (dim 1), "replicated".


def tp_split_kind(name: str) -> str:
    """How a Megatron parameter is laid out across tensor-parallel ranks (see module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("layer_norm_weight", "layer_norm_bias") or "layernorm" in name:
        return "replicated"
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "vocab"
    if ".linear_qkv." in name:
        return "qkv"
    if ".linear_fc1." in name:
        return "fc1"
    if ".linear_proj." in name or ".linear_fc2." in name:
        # Row-parallel: the weight is split on its input dim; a bias would be replicated.
        return "row" if leaf == "weight" else "replicated"
    raise ValueError(f"no tensor-parallel rule for Megatron parameter {name!r}")


def _check_divisible(name: str, size: int, tp_size: int, what: str) -> None:
    if size % tp_size != 0:
        raise ValueError(f"{name}: {what} {size} is not divisible by learner.tp = {tp_size}")


def shard_for_tp(name: str, full_tensor: torch.Tensor, tp_size: int, tp_rank: int, spec: ModelSpec) -> torch.Tensor:
    """The slice of a full Megatron tensor held by tensor-parallel rank ``tp_rank`` (a contiguous copy)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    kind = tp_split_kind(name)
    if kind == "replicated" or tp_size == 1:
        return full_tensor.clone()
    if kind == "qkv":
        _check_divisible(name, spec.num_query_groups, tp_size, "num_query_groups")
        return full_tensor.chunk(tp_size, dim=0)[tp_rank].clone()
    if kind in ("vocab", "column"):
        _check_divisible(name, full_tensor.shape[0], tp_size, "dim 0")
        return full_tensor.chunk(tp_size, dim=0)[tp_rank].clone()
    if kind == "fc1":
        _check_divisible(name, full_tensor.shape[0] // 2, tp_size, "ffn_hidden_size")
        gate, up = full_tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    if kind == "row":
        _check_divisible(name, full_tensor.shape[1], tp_size, "dim 1")
        return full_tensor.chunk(tp_size, dim=1)[tp_rank].clone()
    raise AssertionError(kind)


def unshard_from_tp(name: str, shards: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """Inverse of :func:`shard_for_tp`: join the shards of all TP ranks (in rank order) into the full tensor."""
    if not shards:
        raise ValueError(f"{name}: no shards")
    tp_size = len(shards)
    kind = tp_split_kind(name)
    if kind == "replicated" or tp_size == 1:
        return shards[0].clone()
    if kind in ("qkv", "vocab", "column"):
        return torch.cat(shards, dim=0)
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------------------------
# One parameter at a time (the resharding bridge streams parameter by parameter)
# ----------------------------------------------------------------------------------------------------------------


def megatron_param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every Megatron parameter (local-spec names, global layers) and its full shape, in canonical order.

    Layer by layer in the order of :func:`megatron_to_hf` (embedding, layers 0..L-1, final norm, output layer), so a
    stream of these parameters reaches the engine layer by layer; within a layer the fused QKV bias follows the
    QKV weight (HF interleaves q.weight, q.bias, k.weight, ...), which loading by name does not care about. No ``output_layer`` with tied embeddings.
    """
    h, d, f, v = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size, spec.vocab_size
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (v, h)}
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv_rows, h)
        if spec.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
        shapes[p + "self_attention.linear_proj.weight"] = (h, spec.num_attention_heads * d)
        if spec.qk_norm:
            shapes[p + "self_attention.q_layernorm.weight"] = (d,)
            shapes[p + "self_attention.k_layernorm.weight"] = (d,)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.linear_fc1.weight"] = (2 * f, h)
        shapes[p + "mlp.linear_fc2.weight"] = (h, f)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["output_layer.weight"] = (v, h)
    return shapes


_MG_TO_HF_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_MG_TO_HF_FUSED = {
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def megatron_param_hf_names(name: str) -> tuple[str, ...]:
    """The HF tensor names one Megatron parameter becomes (three for the fused QKV, two for fc1, else one)."""
    name = to_local_spec_norm_name(name)
    if name in _MG_TO_HF_TOP:
        return (_MG_TO_HF_TOP[name],)
    i, rest = megatron_layer_index(name)
    if i is None:
        raise ValueError(f"no HF name for Megatron parameter {name!r}")
    if rest in _MG_TO_HF_FUSED:
        return tuple(f"model.layers.{i}.{r}" for r in _MG_TO_HF_FUSED[rest])
    if rest in _MG_TO_HF_SIMPLE:
        return (f"model.layers.{i}.{_MG_TO_HF_SIMPLE[rest]}",)
    raise ValueError(f"no HF name for Megatron parameter {name!r}")


def megatron_param_to_hf(name: str, tensor: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Split one full Megatron parameter into its HF tensors (names from :func:`megatron_param_hf_names`).

    Splitting acts on dim 0 only, so it applies unchanged to anything laid out row by row like the weight: the
    packed codes ``[N, K/2]`` and block scales ``[N, K/16]`` of an NVFP4 weight, or the ``[N, 1]`` per-channel
    scales of FP8/INT8 -- which is what lets the bridge quantize before it splits.
    """
    names = megatron_param_hf_names(name)
    if len(names) == 1:
        return [(names[0], tensor)]
    if len(names) == 3:
        return list(zip(names, _split_qkv(tensor, spec), strict=True))
    gate, up = tensor.chunk(2, dim=0)
    return [(names[0], gate), (names[1], up)]


# ----------------------------------------------------------------------------------------------------------------
# One rank's shard as slices of HF tensors (the checkpoint reader reads only these bytes)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFSlice:
    """Rows ``[start, stop)`` of HF tensor ``name`` along ``dim`` (the whole tensor when it spans the dim)."""

    name: str
    dim: int
    start: int
    stop: int


def hf_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of ``spec`` must hold and its shape (no ``lm_head.weight`` when tied).

    Derived from :func:`megatron_param_shapes` through :func:`megatron_param_to_hf` on meta tensors, so the rules
    that split a fused parameter are the ones that define what the file must contain.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in megatron_param_shapes(spec).items():
        for hf_name, t in megatron_param_to_hf(name, torch.empty(shape, device="meta"), spec):
            shapes[hf_name] = tuple(t.shape)
    return shapes


def is_ignored_hf_tensor(name: str) -> bool:
    """Buffers some older checkpoints carry (``rotary_emb.inv_freq``): recomputed by both sides, never loaded."""
    return _IGNORED_HF.search(name) is not None


def check_hf_checkpoint(
    shapes: Mapping[str, tuple[int, ...]], spec: ModelSpec, where: Callable[[str], str] = lambda name: "the checkpoint"
) -> None:
    """Raise a one-line ``ValueError`` unless ``shapes`` (HF name -> shape, as stored) is exactly a ``spec`` model.

    Names the first offending tensor and where it lives (``where(name)``, e.g. its shard file) and says how many
    more there are: a missing tensor, a tensor of the wrong shape, or a tensor no parameter of ``spec`` takes.
    A tied model may also store ``lm_head.weight`` (the loader checks it equals the embedding).
    """
    expected = hf_tensor_shapes(spec)
    if spec.tie_word_embeddings:
        expected_optional = {"lm_head.weight": expected["model.embed_tokens.weight"]}
    else:
        expected_optional = {}

    def fail(problem: str, names: list[str], fix: str) -> None:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(f"{where(names[0])}: {problem.format(name=names[0])}{more}; {fix}")

    missing = [n for n in expected if n not in shapes]
    if missing:
        fail("{name} is missing", missing, f"the folder is not a complete {spec.arch} checkpoint of config.json")
    unexpected = [n for n in shapes if n not in expected and n not in expected_optional and not is_ignored_hf_tensor(n)]
    if unexpected:
        fail(
            "tensor {name} is not part of a " + spec.arch + " model",
            unexpected,
            "the weights do not match config.json (architecture or num_hidden_layers)",
        )
    for name, shape in shapes.items():
        want = expected.get(name, expected_optional.get(name))
        if want is not None and tuple(shape) != want:
            raise ValueError(
                f"{where(name)}: tensor {name} has shape {tuple(shape)}, config.json implies {want}; "
                "the weights do not match config.json"
            )


def megatron_shard_slices(
    name: str, spec: ModelSpec, tp_size: int, tp_rank: int, hf_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[HFSlice, ...]:
    """The HF slices that make up tensor-parallel rank ``tp_rank``'s shard of Megatron parameter ``name``.

    Same result as ``shard_for_tp(name, hf_to_megatron(full)[name], ...)`` once joined by
    :func:`assemble_megatron_shard`, but only this rank's rows/columns are named: fused QKV = the q, k and v rows of
    the rank's query groups; fc1 = the rank's gate rows then its up rows; row-parallel = its columns; vocab-parallel
    = its vocabulary rows; replicated = the whole tensor. ``name`` is a global (layer-numbered) Megatron name, local-
    or TE-spec; a tied model's ``output_layer.weight`` reads the embedding. ``hf_shapes``: the stored HF shapes.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    local_name = to_local_spec_norm_name(name)
    if local_name == "output_layer.weight" and spec.tie_word_embeddings:
        hf_names: tuple[str, ...] = ("model.embed_tokens.weight",)
    else:
        hf_names = megatron_param_hf_names(local_name)
    kind = tp_split_kind(local_name)

    def whole(hf_name: str) -> HFSlice:
        return HFSlice(hf_name, 0, 0, hf_shapes[hf_name][0])

    def chunk(hf_name: str, dim: int) -> HFSlice:
        size = hf_shapes[hf_name][dim]
        _check_divisible(hf_name, size, tp_size, f"dim {dim}")
        per = size // tp_size
        return HFSlice(hf_name, dim, tp_rank * per, (tp_rank + 1) * per)

    if kind == "replicated" or tp_size == 1:
        return tuple(whole(n) for n in hf_names)
    if kind == "qkv":
        _check_divisible(name, spec.num_query_groups, tp_size, "num_query_groups")
        groups = spec.num_query_groups // tp_size
        first, d, hpg = tp_rank * groups, spec.kv_channels, spec.heads_per_group
        q, k, v = hf_names
        return (
            HFSlice(q, 0, first * hpg * d, (first + groups) * hpg * d),
            HFSlice(k, 0, first * d, (first + groups) * d),
            HFSlice(v, 0, first * d, (first + groups) * d),
        )
    if kind == "fc1":
        return tuple(chunk(n, 0) for n in hf_names)
    if kind in ("vocab", "column"):
        return (chunk(hf_names[0], 0),)
    if kind == "row":
        return (chunk(hf_names[0], 1),)
    raise AssertionError(kind)


def megatron_shard_shape(slices: tuple[HFSlice, ...], hf_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the shard :func:`assemble_megatron_shard` makes from ``slices`` (fused pieces join on dim 0)."""
    shapes = []
    for s in slices:
        shape = list(hf_shapes[s.name])
        if shape:
            shape[s.dim] = s.stop - s.start
        shapes.append(shape)
    if len(shapes) == 1:
        return tuple(shapes[0])
    return (sum(sh[0] for sh in shapes), *shapes[0][1:])


def assemble_megatron_shard(name: str, pieces: list[torch.Tensor], spec: ModelSpec, tp_size: int) -> torch.Tensor:
    """Join the tensors read for :func:`megatron_shard_slices` (same order) into the rank's Megatron shard."""
    kind = tp_split_kind(to_local_spec_norm_name(name))
    if len(pieces) == 1:
        return pieces[0]
    if kind == "qkv":
        # The rank holds whole query groups: fuse them exactly as the full model is fused, with the per-rank counts.
        local = dataclasses.replace(
            spec,
            num_attention_heads=spec.num_attention_heads // tp_size,
            num_query_groups=spec.num_query_groups // tp_size,
            head_dim=spec.kv_channels,
        )
        q, k, v = pieces
        return _fuse_qkv(q, k, v, local)
    if kind == "fc1":
        return torch.cat(pieces, dim=0)
    raise ValueError(f"{name}: {len(pieces)} HF pieces for a {kind} parameter")
