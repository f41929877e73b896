"""te_ext helpers the resharding bridge relies on (unit, no engine).

* ``vllm_export.checkpoint_layout`` announces exactly the tensors ``te_ext.quantize(w, fmt).state_dict("")`` makes;
* ``vllm_export.dequantize_checkpoint`` decodes ``quantize_state_dict``'s output to ``dequantized_state_dict``'s
  weights bit for bit;
* quantize-before-gather is exact: FP8/INT8 per-channel column slices with the all-rows ``row_amax``, and NVFP4 row
  or 16-aligned column slices with the whole tensor's ``global_amax``, concatenate to the whole tensor's codes and
  scales.
"""

from __future__ import annotations

import pytest
import torch

import te_ext
from te_ext.vllm_export import (
    checkpoint_layout,
    dequantize_checkpoint,
    dequantized_state_dict,
    quantize_state_dict,
)

pytestmark = pytest.mark.unit

SHAPES = [(48, 64), (5, 32), (1, 16), (130, 352), (7, 4096)]


def weight(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    return w.to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b))


# ----------------------------------------------------------------------------------------------------------------
# checkpoint_layout
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("fmt", "opts"), [("nvfp4", {}), ("fp8", {"granularity": "channel"}), ("int8", {})])
def test_checkpoint_layout_matches_quantize_state_dict(fmt: str, opts: dict, shape: tuple[int, int]) -> None:
    sd = te_ext.quantize(weight(shape), fmt, **opts).state_dict("")
    got = [(name, tuple(t.shape), t.dtype) for name, t in sd.items()]
    assert checkpoint_layout(fmt, shape) == got
    assert checkpoint_layout(fmt, list(shape)) == got
    # with a prefix, the same tensors in the same order
    prefixed = te_ext.quantize(weight(shape), fmt, **opts).state_dict("model.layers.0.mlp.down_proj.")
    assert [n.rsplit(".", 1)[-1] for n in prefixed] == [n for n, _, _ in got]


def test_checkpoint_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        checkpoint_layout("fp8", (4, 4, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        checkpoint_layout("nvfp4", (8, 24))
    with pytest.raises(ValueError, match="format"):
        checkpoint_layout("mxfp4", (8, 32))
    with pytest.raises(ValueError, match="format"):
        checkpoint_layout("bf16", (8, 32))


# ----------------------------------------------------------------------------------------------------------------
# dequantize_checkpoint
# ----------------------------------------------------------------------------------------------------------------


def hf_state(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    h, f, nh, ng, d, v = 64, 96, 4, 2, 16, 40
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * d, h),
            p + "self_attn.q_proj.bias": (nh * d,),
            p + "self_attn.k_proj.weight": (ng * d, h),
            p + "self_attn.k_proj.bias": (ng * d,),
            p + "self_attn.v_proj.weight": (ng * d, h),
            p + "self_attn.v_proj.bias": (ng * d,),
            p + "self_attn.o_proj.weight": (h, nh * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return {
        n: weight(s if len(s) == 2 else (1, *s), seed + k, dtype).reshape(s) for k, (n, s) in enumerate(shapes.items())
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "int8"])
def test_dequantize_checkpoint_equals_dequantized_state_dict(fmt: str, dtype: torch.dtype) -> None:
    sd = hf_state()
    ckpt = quantize_state_dict(sd, fmt)
    assert ckpt["lm_head.weight"].dtype == torch.bfloat16  # the head is ignored by default
    code = "weight_packed" if fmt == "nvfp4" else "weight"
    assert ckpt[f"model.layers.0.self_attn.q_proj.{code}"].dtype in (torch.uint8, torch.float8_e4m3fn, torch.int8)
    got = dequantize_checkpoint(ckpt, fmt, dtype=dtype)
    ref = dequantized_state_dict(sd, fmt, dtype=dtype)
    assert sorted(got) == sorted(ref) == sorted(sd)
    for name in ref:
        assert bit_equal(got[name], ref[name]), name
    # quantization really happened (the linears differ from a plain cast), the rest is a plain cast
    assert not torch.equal(
        got["model.layers.1.mlp.down_proj.weight"], sd["model.layers.1.mlp.down_proj.weight"].to(dtype)
    )
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ):
        assert bit_equal(got[name], sd[name].to(dtype)), name


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "int8"])
def test_dequantize_checkpoint_of_a_part(fmt: str) -> None:
    """A bucket holds a part of the checkpoint: every module whose tensors are all there decodes alone."""
    sd = hf_state(seed=7)
    ckpt = quantize_state_dict(sd, fmt)
    ref = dequantized_state_dict(sd, fmt)
    part = {n: t for n, t in ckpt.items() if n.startswith("model.layers.1.self_attn.")}
    got = dequantize_checkpoint(part, fmt)
    assert sorted(got) == sorted(n for n in ref if n.startswith("model.layers.1.self_attn."))
    for name, t in got.items():
        assert bit_equal(t, ref[name]), name
    # a code tensor without its scales is an error
    code = "weight_packed" if fmt == "nvfp4" else "weight"
    lonely = {f"model.layers.0.mlp.down_proj.{code}": ckpt[f"model.layers.0.mlp.down_proj.{code}"]}
    with pytest.raises(ValueError, match="comes without"):
        dequantize_checkpoint(lonely, fmt)
    with pytest.raises(ValueError, match="format"):
        dequantize_checkpoint(part, "bf16")


# ----------------------------------------------------------------------------------------------------------------
# row_amax (FP8 / INT8 per channel, row-split TP shards)
# ----------------------------------------------------------------------------------------------------------------


def column_cuts(k: int, parts: int) -> list[tuple[int, int]]:
    step = k // parts
    edges = [i * step for i in range(parts)] + [k]
    return list(zip(edges[:-1], edges[1:], strict=True))


ROW_CASES = [
    ((48, 64), 2),
    ((48, 64), 4),
    ((33, 100), 3),  # uneven cuts, not multiples of anything
    ((130, 352), 2),
    ((3, 300_000), 2),  # rows longer than a CPU tile: the whole tensor takes te_ext's two-pass path
]


@pytest.mark.parametrize("arith", ["compressed_tensors", "vllm"])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize(("shape", "parts"), ROW_CASES)
def test_row_amax_column_slices_concatenate_to_whole(fmt: str, arith: str, shape: tuple[int, int], parts: int) -> None:
    w = weight(shape, seed=11)
    whole = te_ext.quantize(w, fmt, granularity="channel", arith=arith).state_dict("")
    row_amax = w.abs().amax(dim=1).float()  # what the TP group's all-reduce(MAX) of shard maxima gives
    slices = [
        te_ext.quantize(w[:, a:b], fmt, granularity="channel", arith=arith, row_amax=row_amax).state_dict("")
        for a, b in column_cuts(shape[1], parts)
    ]
    codes = torch.cat([s["weight"] for s in slices], dim=1)
    assert bit_equal(codes, whole["weight"])
    for s in slices:
        assert bit_equal(s["weight_scale"], whole["weight_scale"])
    # [rows, 1] row_amax is accepted too
    again = te_ext.quantize(
        w[:, : shape[1] // parts], fmt, granularity="channel", arith=arith, row_amax=row_amax[:, None]
    )
    assert bit_equal(again.state_dict("")["weight"], slices[0]["weight"])


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_row_amax_from_all_reduce_of_shard_maxima(fmt: str) -> None:
    """The bridge all-reduces (MAX) each shard's per-row maxima: same row_amax as the whole tensor's."""
    w = weight((40, 96), seed=3)
    shards = w.chunk(3, dim=1)
    reduced = torch.stack([s.abs().amax(dim=1).float() for s in shards]).amax(dim=0)
    whole = te_ext.quantize(w, fmt, granularity="channel")
    codes = torch.cat([te_ext.quantize(s, fmt, granularity="channel", row_amax=reduced).codes for s in shards], dim=1)
    assert bit_equal(codes, whole.codes)
    # without the shared maxima the shards would (generally) not match
    local = torch.cat([te_ext.quantize(s, fmt, granularity="channel").codes for s in shards], dim=1)
    assert not torch.equal(as_bytes(local), as_bytes(whole.codes))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_row_amax_wrong_count_raises(fmt: str) -> None:
    w = weight((8, 32))
    with pytest.raises(ValueError, match="row_amax has 7 values for 8 rows"):
        te_ext.quantize(w, fmt, granularity="channel", row_amax=torch.ones(7))
    with pytest.raises(ValueError, match="row_amax"):
        te_ext.quantize(w, fmt, granularity="channel", row_amax=torch.ones(8, 2))


@pytest.mark.parametrize(("fmt", "granularity"), [("fp8", "tensor"), ("fp8", "block"), ("int8", "tensor")])
def test_row_amax_needs_channel_granularity(fmt: str, granularity: str) -> None:
    w = weight((8, 32))
    with pytest.raises(ValueError, match="granularity='channel' only"):
        te_ext.quantize(w, fmt, granularity=granularity, row_amax=w.abs().amax(dim=1).float())


def test_row_amax_is_not_an_nvfp4_option() -> None:
    w = weight((8, 32))
    with pytest.raises(ValueError, match="unknown option"):
        te_ext.quantize(w, "nvfp4", row_amax=w.abs().amax(dim=1).float())


# ----------------------------------------------------------------------------------------------------------------
# NVFP4 with the whole tensor's global amax on slices
# ----------------------------------------------------------------------------------------------------------------

NV_CASES = [(48, 64), (130, 352), (5, 4096), (2, 270_336)]


def nvfp4_parts(w: torch.Tensor, amax: torch.Tensor, arith: str) -> dict[str, torch.Tensor]:
    return te_ext.quantize(w, "nvfp4", global_amax=amax, arith=arith).state_dict("")


@pytest.mark.parametrize("arith", ["compressed_tensors", "vllm"])
@pytest.mark.parametrize("shape", NV_CASES)
def test_nvfp4_global_amax_row_slices(shape: tuple[int, int], arith: str) -> None:
    w = weight(shape, seed=5)
    amax = te_ext.global_amax(w)
    whole = nvfp4_parts(w, amax, arith)
    cuts = [0, shape[0] // 3, shape[0] // 3 + 1, shape[0]]
    pieces = [nvfp4_parts(w[a:b], amax, arith) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    for key in ("weight_packed", "weight_scale"):
        assert bit_equal(torch.cat([p[key] for p in pieces], dim=0), whole[key]), key
    for p in pieces:
        assert bit_equal(p["weight_global_scale"], whole["weight_global_scale"])


@pytest.mark.parametrize("arith", ["compressed_tensors", "vllm"])
@pytest.mark.parametrize("shape", NV_CASES)
def test_nvfp4_global_amax_column_slices(shape: tuple[int, int], arith: str) -> None:
    w = weight(shape, seed=9)
    amax = w.abs().amax().float()  # the all-reduced max over shards, as the bridge computes it
    whole = nvfp4_parts(w, amax, arith)
    k = shape[1]
    blocks = k // 16
    cuts = sorted({0, 16, 16 * (blocks // 3), 16 * (2 * blocks // 3), k})
    pieces = [nvfp4_parts(w[:, a:b], amax, arith) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    assert len(pieces) >= 2
    for key in ("weight_packed", "weight_scale"):
        assert bit_equal(torch.cat([p[key] for p in pieces], dim=1), whole[key]), key
    for p in pieces:
        assert bit_equal(p["weight_global_scale"], whole["weight_global_scale"])
    # even TP shards (the learner's row-parallel split)
    for tp in (2, 4):
        if (k // tp) % 16:
            continue
        shards = [nvfp4_parts(s, amax, arith) for s in w.chunk(tp, dim=1)]
        for key in ("weight_packed", "weight_scale"):
            assert bit_equal(torch.cat([p[key] for p in shards], dim=1), whole[key]), (tp, key)


def test_nvfp4_slices_without_shared_amax_differ() -> None:
    """Control: with each slice's own amax the codes/scales do not match the whole tensor's (so the shared global
    amax really is what makes the slices exact)."""
    w = weight((64, 128), seed=1)
    w[:, :64] *= 10  # one shard holds the large values
    whole = te_ext.quantize(w, "nvfp4").state_dict("")
    own = [te_ext.quantize(s, "nvfp4").state_dict("") for s in w.chunk(2, dim=1)]
    assert not bit_equal(own[1]["weight_global_scale"], whole["weight_global_scale"])
    assert not bit_equal(torch.cat([p["weight_scale"] for p in own], dim=1), whole["weight_scale"])


def test_nvfp4_global_amax_below_the_slice_amax_raises() -> None:
    w = weight((8, 32))
    with pytest.raises(ValueError, match="global_amax"):
        te_ext.quantize(w, "nvfp4", global_amax=w.abs().amax().float() / 2)
