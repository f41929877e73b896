"""The resharding bridge's transfer plan (qrl_megatron.bridge.plan) and the per-parameter HF mapping it uses.

Pure: no processes, no engine, no learner. Specs are built directly (the tiny Qwen2 shape, a Llama-like MHA model
with untied embeddings, and a GQA Llama with a custom head_dim); one test checks the tiny spec against the model
folder the tiny builder writes.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import te_ext
from qrl_megatron.bridge.plan import (
    DEFAULT_EXCLUDE,
    RolloutTarget,
    SyncPlan,
    TransferUnit,
    build_plan,
    world_rank,
)
from qrl_megatron.models.hf_mapping import (
    hf_to_megatron,
    megatron_param_hf_names,
    megatron_param_shapes,
    megatron_param_to_hf,
    megatron_to_hf,
    shard_for_tp,
    tp_split_kind,
    unshard_from_tp,
)
from qrl_megatron.models.registry import ModelSpec

pytestmark = pytest.mark.unit

QUANT = ("nvfp4", "fp8", "int8")
FORMATS = ("bf16", *QUANT)
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The tiny model of qrl_megatron.models.tiny: 4-layer Qwen2, hidden 128, 4 heads / 2 KV heads, FFN 352, tied.
TINY = ModelSpec(
    arch="qwen2",
    vocab_size=64,
    hidden_size=128,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=352,
    max_position_embeddings=128,
    rope_theta=10000.0,
    norm_eps=1e-6,
    tie_word_embeddings=True,
    qkv_bias=True,
)
# Llama-like: no QKV bias, untied embeddings (an lm_head to stream), plain multi-head attention.
LLAMA = ModelSpec(
    arch="llama",
    vocab_size=256,
    hidden_size=128,
    num_layers=4,
    num_attention_heads=8,
    num_query_groups=8,
    ffn_hidden_size=256,
    max_position_embeddings=128,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_word_embeddings=False,
    qkv_bias=False,
)
# GQA (8 query heads in 4 groups) with head_dim * heads != hidden, so o_proj is [H, nh*d] with nh*d != H.
GQA = ModelSpec(
    arch="llama",
    vocab_size=128,
    hidden_size=128,
    num_layers=2,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=352,
    max_position_embeddings=128,
    rope_theta=10000.0,
    norm_eps=1e-6,
    tie_word_embeddings=False,
    qkv_bias=False,
    head_dim=32,
)
SPECS = {"tiny": TINY, "llama": LLAMA, "gqa": GQA}


def valid_layouts(spec: ModelSpec, dp: int = 1) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) layouts Megatron accepts for ``spec``: TP divides query groups, heads, FFN and vocab."""
    out = []
    for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4)):
        if (
            spec.num_query_groups % tp == 0
            and spec.num_attention_heads % tp == 0
            and spec.ffn_hidden_size % tp == 0
            and spec.vocab_size % tp == 0
            and spec.num_layers % pp == 0
        ):
            out.append((tp, pp, dp))
    return out


def plan_of(spec: ModelSpec, fmt: str = "bf16", tp: int = 1, pp: int = 1, dp: int = 1, **target) -> SyncPlan:
    return build_plan(spec, tp, pp, dp, RolloutTarget(fmt, **target))


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def hf_canonical_names(spec: ModelSpec) -> list[str]:
    """HF tensor names in the order the plan streams them (written out by hand, independent of the code).

    This is the HF checkpoint order (``megatron_to_hf``'s) except inside a Qwen2 attention block: a unit is one
    Megatron parameter, so the fused QKV weight's three outputs come before the fused bias's three, where an HF
    checkpoint interleaves them (q.weight, q.bias, k.weight, ...). See ``test_stream_order_vs_megatron_to_hf``.
    """
    names = ["model.embed_tokens.weight"]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names.append(p + "input_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(p + f"self_attn.{proj}.weight")
        if spec.qkv_bias:
            names += [p + f"self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        names += [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    names.append("model.norm.weight")
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_shape(name: str, spec: ModelSpec) -> tuple[int, ...]:
    h, d, f, v = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size, spec.vocab_size
    nh, ng = spec.num_attention_heads, spec.num_query_groups
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (v, h)
    leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
    rows = {"q_proj": nh * d, "k_proj": ng * d, "v_proj": ng * d, "gate_proj": f, "up_proj": f}
    if name.endswith(".bias"):
        return (rows[leaf],)
    if leaf in rows:
        return (rows[leaf], h)
    if leaf == "o_proj":
        return (h, nh * d)
    if leaf == "down_proj":
        return (h, f)
    return (h,)  # norms


def quantized_outputs(unit: TransferUnit) -> bool:
    return unit.fmt != "bf16"


# ----------------------------------------------------------------------------------------------------------------
# Order and determinism
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", SPECS)
def test_plan_is_deterministic(name: str, fmt: str) -> None:
    spec = SPECS[name]
    tp, pp, dp = valid_layouts(spec)[-1]
    a = plan_of(spec, fmt, tp, pp, dp, bucket_bytes=4096)
    b = plan_of(spec, fmt, tp, pp, dp, bucket_bytes=4096)
    assert a == b
    assert a.units == b.units
    assert a.fingerprint() == b.fingerprint()
    assert a.describe() == b.describe()
    assert [u.index for u in a.units] == list(range(len(a.units)))


@pytest.mark.parametrize("name", SPECS)
def test_unit_order_is_hf_canonical_order(name: str) -> None:
    spec = SPECS[name]
    plan = plan_of(spec, "bf16")
    assert [u.source for u in plan.units] == list(megatron_param_shapes(spec))
    outputs = [o for u in plan.units for o in u.outputs]
    assert outputs == hf_canonical_names(spec)
    assert plan.wire_names() == hf_canonical_names(spec)
    # first the embedding, then every layer in order, the final norm, and the head only when untied
    assert plan.units[0].source == "embedding.word_embeddings.weight"
    layers = [int(m.group(1)) for u in plan.units if (m := re.match(r"decoder\.layers\.(\d+)\.", u.source))]
    assert layers == sorted(layers) and sorted(set(layers)) == list(range(spec.num_layers))
    tail = [u.source for u in plan.units[-2:]]
    if spec.tie_word_embeddings:
        assert tail[-1] == "decoder.final_layernorm.weight"
        assert all("output_layer" not in u.source for u in plan.units)
    else:
        assert tail == ["decoder.final_layernorm.weight", "output_layer.weight"]


def test_tiny_spec_matches_the_tiny_model_folder(tiny_model_dir) -> None:
    from qrl_megatron.models.registry import load_spec

    assert load_spec(tiny_model_dir) == TINY


# ----------------------------------------------------------------------------------------------------------------
# Wire layout per format
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_bf16_wire_is_one_bf16_tensor_per_hf_name(name: str) -> None:
    spec = SPECS[name]
    plan = plan_of(spec, "bf16", exclude=())
    for u in plan.units:
        assert u.fmt == "bf16" and not u.quantize_before_gather
        assert [w.name for w in u.wire] == list(u.outputs)
        for w in u.wire:
            assert w.dtype == torch.bfloat16
            assert w.shape == hf_shape(w.name, spec), w.name
        assert u.nbytes == u.bf16_bytes == 2 * numel(u.shape)
    assert plan.total_bytes == plan.bf16_bytes
    assert plan.quantized_bytes == (0, 0)


def expected_quant_wire(fmt: str, module: str, n: int, k: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    if fmt == "nvfp4":
        return [
            (f"{module}.weight_packed", (n, k // 2), torch.uint8),
            (f"{module}.weight_scale", (n, k // 16), torch.float8_e4m3fn),
            (f"{module}.weight_global_scale", (1,), torch.float32),
        ]
    code = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
    return [(f"{module}.weight", (n, k), code), (f"{module}.weight_scale", (n, 1), torch.float32)]


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("name", SPECS)
def test_quantized_wire_layout(name: str, fmt: str) -> None:
    spec = SPECS[name]
    plan = plan_of(spec, fmt)
    quantized_modules = []
    for u in plan.units:
        got = [(w.name, w.shape, w.dtype) for w in u.wire]
        if u.fmt == "bf16":
            # embeddings, norms, biases and the (default-excluded) head: one bf16 tensor per HF name
            assert got == [(o, hf_shape(o, spec), torch.bfloat16) for o in u.outputs]
            continue
        assert u.fmt == fmt
        expected = []
        for o in u.outputs:
            assert o.endswith(".weight")
            module = o[: -len(".weight")]
            quantized_modules.append(module.rsplit(".", 1)[-1])
            n, k = hf_shape(o, spec)
            expected += expected_quant_wire(fmt, module, n, k)
        assert got == expected
    # exactly the seven projections of every layer are quantized, nothing else
    assert sorted(quantized_modules) == sorted(LINEAR_LEAVES * spec.num_layers)
    bf16_units = [u for u in plan.units if u.fmt == "bf16"]
    for u in bf16_units:
        assert (
            "layernorm" in u.source
            or u.source.endswith(".bias")
            or "embedding" in u.source
            or u.source == "output_layer.weight"
        ), u.source


@pytest.mark.parametrize("fmt", QUANT)
def test_embeddings_norms_biases_always_bf16(fmt: str) -> None:
    for spec in SPECS.values():
        # even with nothing excluded, none of them is quantized
        plan = plan_of(spec, fmt, exclude=())
        for u in plan.units:
            if u.split in ("vocab", "replicated") or u.source.endswith(".bias"):
                assert u.fmt == "bf16", u.source
                assert all(w.dtype == torch.bfloat16 for w in u.wire)
            else:
                assert u.fmt == fmt, u.source


@pytest.mark.parametrize("fmt", QUANT)
def test_lm_head_stays_bf16(fmt: str) -> None:
    assert DEFAULT_EXCLUDE == ()  # nothing to exclude: lm_head, embeddings, norms and biases are never quantized
    head = [u for u in plan_of(LLAMA, fmt).units if u.source == "output_layer.weight"]
    assert len(head) == 1
    assert head[0].fmt == "bf16" and head[0].wire[0].name == "lm_head.weight"
    assert head[0].wire[0].dtype == torch.bfloat16 and head[0].wire[0].shape == (LLAMA.vocab_size, LLAMA.hidden_size)
    # lm_head is not one of the quantizable projections, so no exclude pattern is needed for it
    head = [
        u for u in plan_of(LLAMA, fmt, exclude=(r"^model\.layers\.0\.",)).units if u.source == "output_layer.weight"
    ]
    assert head[0].fmt == "bf16"


@pytest.mark.parametrize("fmt", QUANT)
def test_custom_exclude_keeps_one_down_proj_bf16(fmt: str) -> None:
    plan = plan_of(LLAMA, fmt, exclude=(r"^model\.layers\.1\.mlp\.down_proj\.",))
    by_source = {u.source: u for u in plan.units}
    kept = by_source["decoder.layers.1.mlp.linear_fc2.weight"]
    assert kept.fmt == "bf16"
    assert [(w.name, w.dtype) for w in kept.wire] == [("model.layers.1.mlp.down_proj.weight", torch.bfloat16)]
    for i in (0, 2, 3):
        assert by_source[f"decoder.layers.{i}.mlp.linear_fc2.weight"].fmt == fmt
    # every other linear of layer 1 is still quantized
    assert by_source["decoder.layers.1.mlp.linear_fc1.weight"].fmt == fmt
    assert by_source["decoder.layers.1.self_attention.linear_qkv.weight"].fmt == fmt
    assert by_source["decoder.layers.1.self_attention.linear_proj.weight"].fmt == fmt
    full = plan_of(LLAMA, fmt, exclude=())
    assert plan.total_bytes - full.total_bytes == kept.bf16_bytes - full.units[kept.index].nbytes > 0


@pytest.mark.parametrize("fmt", QUANT)
def test_excluding_all_of_a_fused_layer_is_allowed(fmt: str) -> None:
    plan = plan_of(
        TINY, fmt, exclude=(r"^model\.layers\.0\.self_attn\.[qkv]_proj\.", r"^model\.layers\.0\.mlp\.(gate|up)_proj\.")
    )
    by_source = {u.source: u for u in plan.units}
    assert by_source["decoder.layers.0.self_attention.linear_qkv.weight"].fmt == "bf16"
    assert by_source["decoder.layers.0.mlp.linear_fc1.weight"].fmt == "bf16"
    assert by_source["decoder.layers.1.self_attention.linear_qkv.weight"].fmt == fmt


@pytest.mark.parametrize(
    "pattern", [r"^model\.layers\.0\.self_attn\.q_proj\.", r"^model\.layers\.2\.mlp\.up_proj\.", r"k_proj"]
)
def test_excluding_part_of_a_fused_layer_raises(pattern: str) -> None:
    with pytest.raises(ValueError, match="fuses"):
        plan_of(TINY, "nvfp4", exclude=(pattern,))
    # no quantization, nothing fused to break
    plan_of(TINY, "bf16", exclude=(pattern,))


# ----------------------------------------------------------------------------------------------------------------
# Layout invariance, owners, stages
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", SPECS)
def test_bytes_and_wire_do_not_depend_on_learner_layout(name: str, fmt: str) -> None:
    spec = SPECS[name]
    layouts = valid_layouts(spec) + [(2, 1, 3), (1, 2, 2)]
    layouts = [lay for lay in layouts if lay in valid_layouts(spec, lay[2])]
    assert len(layouts) >= 4
    plans = [plan_of(spec, fmt, *lay, bucket_bytes=50_000) for lay in layouts]
    ref = plans[0]
    for plan in plans[1:]:
        assert plan.total_bytes == ref.total_bytes
        assert plan.bf16_bytes == ref.bf16_bytes
        assert plan.quantized_bytes == ref.quantized_bytes
        assert plan.wire_names() == ref.wire_names()
        assert [u.wire for u in plan.units] == [u.wire for u in ref.units]
        assert [u.bucket for u in plan.units] == [u.bucket for u in ref.units]
        assert plan.fingerprint() == ref.fingerprint()
    # ... while the ranks that hold the tensors do differ between layouts
    owners = {tuple(u.owners for u in p.units) for p in plans}
    stages = {tuple(u.stage for u in p.units) for p in plans}
    assert len(owners) > 1
    assert len(stages) > 1


def test_fingerprint_follows_the_wire_not_the_layout() -> None:
    prints = {fmt: plan_of(TINY, fmt).fingerprint() for fmt in FORMATS}
    assert len(set(prints.values())) == len(FORMATS)
    for fmt in FORMATS:
        assert plan_of(TINY, fmt, tp=2, pp=2, dp=2).fingerprint() == prints[fmt]
        assert plan_of(TINY, fmt, tp=2, pp=1, dp=1, engine_tp=2).fingerprint() == prints[fmt]
    # the bucket assignment is part of it
    assert plan_of(TINY, "bf16", bucket_bytes=1).fingerprint() != prints["bf16"]
    # and so is which layers stay bf16
    assert plan_of(TINY, "fp8", exclude=(r"down_proj",)).fingerprint() != prints["fp8"]
    assert re.fullmatch(r"[0-9a-f]{16}", prints["bf16"])


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
@pytest.mark.parametrize("name", SPECS)
def test_owners_follow_megatron_rank_order(name: str, fmt: str) -> None:
    spec = SPECS[name]
    for tp, pp, _ in valid_layouts(spec):
        for dp in (1, 2, 3):
            plan = plan_of(spec, fmt, tp, pp, dp)
            world = tp * pp * dp
            for u in plan.units:
                expected = tuple(t + tp * (0 + dp * u.stage) for t in range(tp))
                if u.split == "replicated":
                    expected = expected[:1]
                assert u.owners == expected, (tp, pp, dp, u.source)
                assert u.sender == u.owners[0] == tp * dp * u.stage
                assert all(0 <= r < world for r in u.owners)
                assert u.split == tp_split_kind(u.source)


def test_world_rank_formula() -> None:
    # TP fastest, then DP, then PP
    assert world_rank(0, 0, 0, tp=2, dp=2) == 0
    assert world_rank(1, 0, 0, tp=2, dp=2) == 1
    assert world_rank(0, 0, 1, tp=2, dp=2) == 2
    assert world_rank(0, 1, 0, tp=2, dp=2) == 4
    assert world_rank(1, 1, 1, tp=2, dp=2) == 7
    tp, pp, dp = 2, 3, 2
    ranks = sorted(world_rank(t, p, d, tp, dp) for t in range(tp) for p in range(pp) for d in range(dp))
    assert ranks == list(range(tp * pp * dp))


@pytest.mark.parametrize(("tp", "pp", "dp"), [(2, 2, 2), (4, 2, 1), (2, 4, 3), (1, 2, 4), (8, 1, 2)])
def test_world_rank_matches_megatron_rank_generator(tp: int, pp: int, dp: int) -> None:
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    gen = parallel_state.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    tp_groups = gen.get_ranks("tp")
    pp_groups = gen.get_ranks("pp")
    dp_groups = gen.get_ranks("dp")
    for t, p, d in itertools.product(range(tp), range(pp), range(dp)):
        r = world_rank(t, p, d, tp, dp)
        assert next(g for g in tp_groups if r in g).index(r) == t
        assert next(g for g in pp_groups if r in g).index(r) == p
        assert next(g for g in dp_groups if r in g).index(r) == d
    # the plan's owners of a stage are one whole TP group of Megatron's
    for p in range(pp):
        owners = [world_rank(t, p, 0, tp, dp) for t in range(tp)]
        assert owners in tp_groups


@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_stage_assignment_pp2(name: str) -> None:
    spec = SPECS[name]
    plan = plan_of(spec, "bf16", tp=1, pp=2, dp=1)
    for u in plan.units:
        m = re.match(r"decoder\.layers\.(\d+)\.", u.source)
        if m:
            assert u.stage == (0 if int(m.group(1)) < spec.num_layers // 2 else 1), u.source
        elif u.source == "embedding.word_embeddings.weight":
            assert u.stage == 0
        else:
            assert u.source in ("decoder.final_layernorm.weight", "output_layer.weight")
            assert u.stage == 1
    assert {u.stage for u in plan_of(spec, "bf16", pp=1).units} == {0}
    pp4 = plan_of(spec, "bf16", pp=4)
    for u in pp4.units:
        m = re.match(r"decoder\.layers\.(\d+)\.", u.source)
        if m:
            assert u.stage == int(m.group(1))


def test_learner_pp_must_divide_layers() -> None:
    with pytest.raises(ValueError, match="learner.pp"):
        plan_of(TINY, "bf16", pp=3)


# ----------------------------------------------------------------------------------------------------------------
# Compression ratio
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_quantized_bytes_ratio(name: str) -> None:
    spec = SPECS[name]
    linear_numel = 0
    n_linear_tensors = 0
    n_rows = 0
    for o in hf_canonical_names(spec):
        leaf = o.rsplit(".", 2)[-2]
        if o.endswith(".weight") and leaf in LINEAR_LEAVES:
            shape = hf_shape(o, spec)
            linear_numel += numel(shape)
            n_linear_tensors += 1
            n_rows += shape[0]

    sent, bf16 = plan_of(spec, "nvfp4").quantized_bytes
    assert bf16 == 2 * linear_numel
    # 4-bit codes + one E4M3 scale per 16 values = 0.28125x bf16, plus one float32 global scale per HF tensor
    assert sent == bf16 * 0.28125 + 4 * n_linear_tensors
    assert (sent - 4 * n_linear_tensors) * 32 == bf16 * 9
    for fmt in ("fp8", "int8"):
        sent, bf16 = plan_of(spec, fmt).quantized_bytes
        assert bf16 == 2 * linear_numel
        assert sent == bf16 // 2 + 4 * n_rows  # 1-byte codes + one float32 scale per output channel
        assert 0.5 < sent / bf16 < 0.55
    # and the total counts the bf16 remainder once
    for fmt in QUANT:
        plan = plan_of(spec, fmt)
        rest = sum(u.bf16_bytes for u in plan.units if u.fmt == "bf16")
        assert plan.total_bytes == plan.quantized_bytes[0] + rest
        assert plan.bf16_bytes == plan_of(spec, "bf16").total_bytes


# ----------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------


def check_buckets(plan: SyncPlan) -> None:
    limit = plan.target.bucket_bytes
    buckets = [u.bucket for u in plan.units]
    assert buckets[0] == 0
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(buckets)), "buckets must be consecutive"
    assert plan.num_buckets == buckets[-1] + 1
    assert [u for i in range(plan.num_buckets) for u in plan.bucket(i)] == list(plan.units)
    sizes = []
    for i in range(plan.num_buckets):
        members = plan.bucket(i)
        assert members, f"bucket {i} is empty"
        size = sum(u.nbytes for u in members)
        sizes.append(size)
        if len(members) > 1:
            assert size <= limit, f"bucket {i} holds {size} > {limit} bytes"
        # a unit is never split: all its wire tensors are in the unit, the unit in one bucket
        for u in members:
            assert u.nbytes == sum(w.nbytes for w in u.wire)
    # greedy: a bucket is closed only when the next unit would not fit
    for i in range(plan.num_buckets - 1):
        assert sizes[i] + plan.bucket(i + 1)[0].nbytes > limit
    assert sum(sizes) == plan.total_bytes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bucket_bytes", [1, 300, 4096, 20_000, 100_000, 64 * 2**20])
def test_bucket_assignment(fmt: str, bucket_bytes: int) -> None:
    for spec in SPECS.values():
        plan = plan_of(spec, fmt, tp=2, bucket_bytes=bucket_bytes)
        check_buckets(plan)
        if bucket_bytes == 1:
            assert plan.num_buckets == len(plan.units)
        if bucket_bytes >= plan.total_bytes:
            assert plan.num_buckets == 1
        if bucket_bytes < max(u.nbytes for u in plan.units):
            # oversized units travel alone
            for u in plan.units:
                if u.nbytes > bucket_bytes:
                    assert plan.bucket(u.bucket) == (u,)


def test_rollout_target_validation() -> None:
    with pytest.raises(ValueError, match="rollout.quant"):
        RolloutTarget("fp4")
    with pytest.raises(ValueError, match="rollout.quant"):
        RolloutTarget("mxfp4")
    with pytest.raises(ValueError, match="rollout.tp"):
        RolloutTarget("bf16", engine_tp=0)
    with pytest.raises(ValueError, match="bucket"):
        RolloutTarget("bf16", bucket_bytes=0)
    with pytest.raises(ValueError, match="sync.exclude"):
        RolloutTarget("fp8", exclude=("(unclosed",))


# ----------------------------------------------------------------------------------------------------------------
# Quantize before gather, engine TP
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", SPECS)
def test_quantize_before_gather(name: str, fmt: str) -> None:
    spec = SPECS[name]
    for tp, pp, dp in valid_layouts(spec):
        plan = plan_of(spec, fmt, tp, pp, dp)
        for u in plan.units:
            desc = te_ext.format_descriptor(u.fmt)
            if u.fmt == "bf16":
                assert not u.quantize_before_gather
                assert u.shared_stat is None and u.replicated_components == ()
                continue
            assert u.split in ("qkv", "fc1", "row")
            k_local = u.shape[1] // tp if u.split == "row" else u.shape[1]
            block = desc.block_k
            expected = tp > 1 and not (block is not None and k_local % block)
            assert u.quantize_before_gather == expected, (tp, u.source)
            assert u.shared_stat == desc.shared_stat(u.split, u.quantize_before_gather)
            if u.quantize_before_gather:
                assert u.replicated_components == desc.replicated_components(u.split)
            else:
                assert u.replicated_components == ()


def test_quantize_before_gather_tiny_tp2_covers_row_split() -> None:
    for fmt in QUANT:
        plan = plan_of(TINY, fmt, tp=2)
        quantized = [u for u in plan.units if quantized_outputs(u)]
        assert {u.split for u in quantized} == {"qkv", "fc1", "row"}
        assert all(u.quantize_before_gather for u in quantized)
        assert not any(u.quantize_before_gather for u in plan_of(TINY, fmt, tp=1).units)
        row = next(u for u in quantized if u.source.endswith("linear_fc2.weight"))
        col = next(u for u in quantized if u.split == "qkv")
        if fmt == "nvfp4":
            assert row.shared_stat == col.shared_stat == "global_amax"
            assert row.replicated_components == col.replicated_components == ("weight_global_scale",)
        else:
            assert row.shared_stat == "row_amax" and row.replicated_components == ("weight_scale",)
            assert col.shared_stat is None and col.replicated_components == ()
        assert len(col.outputs) == 3 and len(next(u for u in quantized if u.split == "fc1").outputs) == 2


def test_nvfp4_row_split_shard_not_block_aligned_gathers_first() -> None:
    # GQA: FFN 352 on learner TP4 -> 88 down_proj inputs per rank, not a multiple of 16
    plan = plan_of(GQA, "nvfp4", tp=4)
    fc2 = [u for u in plan.units if u.source.endswith("linear_fc2.weight")]
    assert fc2 and all(not u.quantize_before_gather for u in fc2)
    assert fc2[0].shared_stat == "global_amax" and fc2[0].replicated_components == ()
    proj = [u for u in plan.units if u.source.endswith("linear_proj.weight")]  # 256 / 4 = 64: aligned
    assert all(u.quantize_before_gather for u in proj)
    # fp8/int8 have no blocks along K: still before the gather
    assert all(u.quantize_before_gather for u in plan_of(GQA, "fp8", tp=4).units if u.fmt != "bf16")


def test_engine_tp_nvfp4_block_alignment() -> None:
    # TINY: down_proj input 352 -> 176 per rank at engine TP 2 (ok), 88 at engine TP 4 (not a multiple of 16)
    plan_of(TINY, "nvfp4", engine_tp=2)
    with pytest.raises(ValueError, match="multiple of the 16-element NVFP4 block") as e:
        plan_of(TINY, "nvfp4", engine_tp=4)
    assert "down_proj" in str(e.value) and "88" in str(e.value)
    # only NVFP4 has the block constraint
    for fmt in ("bf16", "fp8", "int8"):
        plan_of(TINY, fmt, engine_tp=4)


def test_engine_tp_must_divide_heads_and_ffn() -> None:
    with pytest.raises(ValueError, match="rollout.tp=3"):
        plan_of(TINY, "bf16", engine_tp=3)
    with pytest.raises(ValueError, match="attention heads"):
        plan_of(TINY, "bf16", engine_tp=8)
    # engine TP a multiple of the KV heads (KV heads replicated) is allowed
    plan_of(GQA, "bf16", engine_tp=8)


# ----------------------------------------------------------------------------------------------------------------
# describe()
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_describe_lists_every_unit(fmt: str) -> None:
    plan = plan_of(LLAMA, fmt, tp=2, pp=2, dp=2, bucket_bytes=100_000)
    text = plan.describe()
    lines = text.splitlines()
    assert len(lines) == 1 + len(plan.units)
    assert f"{len(plan.units)} tensors" in lines[0] and f"{plan.num_buckets} buckets" in lines[0]
    assert "TP2 PP2 DP2" in lines[0] and f"engine TP1 {fmt}" in lines[0]
    for line, u in zip(lines[1:], plan.units, strict=True):
        assert line.startswith(f"  [{u.bucket}] {u.source} stage {u.stage} ranks {list(u.owners)}: ")
        assert line.endswith(" -> ".join(u.transforms))


# ----------------------------------------------------------------------------------------------------------------
# hf_mapping: one parameter at a time
# ----------------------------------------------------------------------------------------------------------------


def random_megatron_state(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in megatron_param_shapes(spec).items()}


@pytest.mark.parametrize("name", SPECS)
def test_megatron_param_shapes_match_the_conversion(name: str) -> None:
    spec = SPECS[name]
    shapes = megatron_param_shapes(spec)
    g = torch.Generator().manual_seed(1)
    hf = {n: torch.randn(hf_shape(n, spec), generator=g) for n in hf_canonical_names(spec)}
    mg = hf_to_megatron(hf, spec)
    assert list(mg) == list(shapes)
    assert {n: tuple(t.shape) for n, t in mg.items()} == shapes


@pytest.mark.parametrize("name", SPECS)
def test_param_by_param_equals_whole_dict_conversion(name: str) -> None:
    spec = SPECS[name]
    sd = random_megatron_state(spec)
    whole = megatron_to_hf(sd, spec)
    pieces: list[tuple[str, torch.Tensor]] = []
    for n, t in sd.items():
        out = megatron_param_to_hf(n, t, spec)
        assert [o for o, _ in out] == list(megatron_param_hf_names(n))
        pieces += out
    assert sorted(n for n, _ in pieces) == sorted(whole)
    assert len(pieces) == len(whole)
    for n, t in pieces:
        assert torch.equal(t, whole[n]), n
    assert [n for n, _ in pieces] == hf_canonical_names(spec)


@pytest.mark.parametrize("name", SPECS)
def test_stream_order_vs_megatron_to_hf(name: str) -> None:
    """Parameter-by-parameter order == megatron_to_hf's order, except that with a QKV bias (Qwen2) the three
    biases follow the three weights instead of being interleaved with them (same layer, same set of names)."""
    spec = SPECS[name]
    whole = list(megatron_to_hf(random_megatron_state(spec), spec))
    streamed = [o for n in megatron_param_shapes(spec) for o in megatron_param_hf_names(n)]
    if not spec.qkv_bias:
        assert streamed == whole
        return
    assert streamed != whole

    def key(n: str) -> str:
        return re.sub(r"\.(q|k|v)_proj\.(weight|bias)$", ".qkv", n)

    # collapsing q/k/v weight+bias into one slot per layer makes the two orders identical
    assert list(dict.fromkeys(map(key, streamed))) == list(dict.fromkeys(map(key, whole)))
    assert sorted(streamed) == sorted(whole)


def test_param_hf_names_accept_te_norm_names_and_reject_unknown() -> None:
    assert megatron_param_hf_names("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == (
        "model.layers.3.input_layernorm.weight",
    )
    assert megatron_param_hf_names("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == (
        "model.layers.0.post_attention_layernorm.weight",
    )
    assert megatron_param_hf_names("decoder.layers.2.mlp.linear_fc1.weight") == (
        "model.layers.2.mlp.gate_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
    )
    assert megatron_param_hf_names("decoder.layers.1.self_attention.linear_qkv.bias") == (
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.self_attn.k_proj.bias",
        "model.layers.1.self_attn.v_proj.bias",
    )
    assert megatron_param_hf_names("output_layer.weight") == ("lm_head.weight",)
    for bad in ("decoder.layers.0.mlp.router.weight", "embedding.position_embeddings.weight", "foo"):
        with pytest.raises(ValueError, match="no HF name"):
            megatron_param_hf_names(bad)


@pytest.mark.parametrize("name", ["tiny", "gqa"])
def test_param_to_hf_splits_other_tails_row_by_row(name: str) -> None:
    """Splitting acts on dim 0 only: a tensor with a different tail (packed codes, block scales) splits like the
    weight it came from."""
    spec = SPECS[name]
    sd = random_megatron_state(spec, seed=3)
    for source in ("decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight"):
        w = sd[source]
        amax = te_ext.global_amax(w)
        qt = te_ext.quantize(w, "nvfp4", global_amax=amax).state_dict("")
        assert qt["weight_packed"].shape == (w.shape[0], w.shape[1] // 2)
        split_weight = megatron_param_to_hf(source, w, spec)
        for suffix in ("weight_packed", "weight_scale"):
            split_codes = megatron_param_to_hf(source, qt[suffix], spec)
            assert [n for n, _ in split_codes] == [n for n, _ in split_weight]
            for (n, piece), (_, wp) in zip(split_codes, split_weight, strict=True):
                direct = te_ext.quantize(wp, "nvfp4", global_amax=amax).state_dict("")[suffix]
                assert piece.shape == direct.shape, n
                assert torch.equal(piece.view(torch.uint8), direct.view(torch.uint8)), (n, suffix)
        # per-channel scales [N, 1] split too
        q8 = te_ext.quantize(w, "fp8", granularity="channel").state_dict("")
        for (_, piece), (_, wp) in zip(
            megatron_param_to_hf(source, q8["weight_scale"], spec), split_weight, strict=True
        ):
            assert torch.equal(piece, te_ext.quantize(wp, "fp8", granularity="channel").state_dict("")["weight_scale"])
        # an arbitrary tail: each output is the same rows as the split weight
        tail = torch.arange(w.shape[0] * 6, dtype=torch.float32).reshape(w.shape[0], 2, 3)
        ids = torch.arange(w.shape[0], dtype=torch.float32)
        for (_, piece), (_, row_ids) in zip(
            megatron_param_to_hf(source, tail, spec),
            megatron_param_to_hf(source, ids, spec),
            strict=True,
        ):
            assert torch.equal(piece, tail[row_ids.long()])


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shards_of_packed_codes_unshard_like_the_weight(tp: int) -> None:
    """The bridge's quantize-before-gather path: quantize each TP shard with the shared amax, join the codes with
    the weight's TP rule, split to HF -> the same as quantizing each HF tensor of the gathered weight."""
    spec = TINY
    sd = random_megatron_state(spec, seed=5)
    for source in (
        "decoder.layers.2.self_attention.linear_qkv.weight",
        "decoder.layers.2.mlp.linear_fc1.weight",
        "decoder.layers.2.mlp.linear_fc2.weight",
        "decoder.layers.2.self_attention.linear_proj.weight",
    ):
        w = sd[source].to(torch.bfloat16)
        amax = w.abs().amax().float()
        shards = [shard_for_tp(source, w, tp, r, spec) for r in range(tp)]
        local = [te_ext.quantize(s, "nvfp4", global_amax=amax).state_dict("") for s in shards]
        for suffix in ("weight_packed", "weight_scale"):
            joined = unshard_from_tp(source, [q[suffix] for q in local], spec)
            for n, piece in megatron_param_to_hf(source, joined, spec):
                whole = dict(megatron_param_to_hf(source, w, spec))[n]
                direct = te_ext.quantize(whole, "nvfp4", global_amax=amax).state_dict("")[suffix]
                assert torch.equal(piece.view(torch.uint8), direct.view(torch.uint8)), (source, n, suffix)


def test_nvfp4_needs_block_aligned_inputs() -> None:
    # o_proj / down_proj inputs are 64 / 160, but the hidden size (q/k/v and gate/up input) is 72
    odd = ModelSpec(
        arch="llama",
        vocab_size=32,
        hidden_size=72,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=160,
        max_position_embeddings=64,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_word_embeddings=True,
        qkv_bias=False,
        head_dim=16,
    )
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_of(odd, "nvfp4")
    for fmt in ("bf16", "fp8", "int8"):
        assert plan_of(odd, fmt).total_bytes > 0
