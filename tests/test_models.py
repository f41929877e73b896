"""Model registry, HF <-> Megatron mapping, tiny model/tokenizer, and Megatron model parity (single and multi-process)."""

from __future__ import annotations

import pytest
import torch
from _models_dist_workers import example_batch, layout_worker, load_hf_weights
from dist_utils import each_layout, run_distributed

from qrl_megatron.models.hf_mapping import (
    hf_to_megatron,
    megatron_to_hf,
    pp_layer_offset,
    shard_for_tp,
    to_local_spec_norm_names,
    to_te_norm_names,
    tp_split_kind,
    unshard_from_tp,
)
from qrl_megatron.models.registry import ModelSpec, load_spec, spec_from_hf_config
from qrl_megatron.platform import validate_layout

# fp32 Megatron vs transformers (and TP/PP layouts vs TP=1): measured max |diff| ~4e-7 on logits of size ~1.
LOGITS_ATOL = 1e-5
LOGITS_RTOL = 1e-5

LLAMA_SPEC = ModelSpec(
    arch="llama",
    vocab_size=96,
    hidden_size=64,
    num_layers=3,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=48,
    max_position_embeddings=64,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_word_embeddings=False,
    qkv_bias=False,
)


def random_hf_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, d, f, v = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size, spec.vocab_size
    nh, ng = spec.num_attention_heads, spec.num_query_groups

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    sd = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": r(h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": r(h),
                p + "self_attn.q_proj.weight": r(nh * d, h),
                p + "self_attn.k_proj.weight": r(ng * d, h),
                p + "self_attn.v_proj.weight": r(ng * d, h),
                p + "self_attn.o_proj.weight": r(h, nh * d),
                p + "post_attention_layernorm.weight": r(h),
                p + "mlp.gate_proj.weight": r(f, h),
                p + "mlp.up_proj.weight": r(f, h),
                p + "mlp.down_proj.weight": r(h, f),
            }
        )
        if spec.qkv_bias:
            sd.update(
                {
                    p + "self_attn.q_proj.bias": r(nh * d),
                    p + "self_attn.k_proj.bias": r(ng * d),
                    p + "self_attn.v_proj.bias": r(ng * d),
                }
            )
    if not spec.tie_word_embeddings:
        sd["lm_head.weight"] = r(v, h)
    return sd


# ------------------------------------------------------------------------------------------------ registry / spec


@pytest.mark.unit
def test_load_spec_of_tiny_model(tiny_model_dir):
    spec = load_spec(tiny_model_dir)
    assert spec == ModelSpec(
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
    assert spec.kv_channels == 32


@pytest.mark.unit
def test_spec_from_hf_config_rejects_other_architectures():
    from transformers import LlamaConfig

    llama = spec_from_hf_config(LlamaConfig(architectures=["LlamaForCausalLM"], num_key_value_heads=8))
    assert llama.arch == "llama" and not llama.qkv_bias and llama.num_query_groups == 8
    with pytest.raises(ValueError, match="Qwen2ForCausalLM, LlamaForCausalLM"):
        spec_from_hf_config({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})


@pytest.mark.unit
def test_transformer_config_settings():
    from qrl_megatron.models.registry import transformer_config

    spec = LLAMA_SPEC
    cfg = transformer_config(spec, tp=1, pp=1, params_dtype=torch.bfloat16, init_method_std=0.01)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert not cfg.add_qkv_bias and cfg.num_query_groups == 2 and cfg.kv_channels == 8
    assert cfg.params_dtype == cfg.pipeline_dtype == torch.bfloat16 and cfg.bf16
    assert cfg.hidden_dropout == 0 and cfg.attention_dropout == 0 and not cfg.sequence_parallel
    assert cfg.init_method_std == 0.01
    if not torch.cuda.is_available():
        assert cfg.use_cpu_initialization and not cfg.batch_p2p_comm


@pytest.mark.unit
def test_validate_layout_errors_name_the_key():
    assert validate_layout(2, 2, None, 8) == 2
    with pytest.raises(ValueError, match=r"learner\.tp \* learner\.pp \* learner\.dp = 2\*2\*1 = 4 .* world size 2"):
        validate_layout(2, 2, 1, 2)
    with pytest.raises(ValueError, match=r"learner\.tp \* learner\.pp = 1\*3"):
        validate_layout(1, 3, None, 4)
    with pytest.raises(ValueError, match=r"learner\.tp = 4 must divide the model's num_query_groups"):
        validate_layout(4, 1, 1, 4, num_layers=4, num_attention_heads=8, num_query_groups=2, vocab_size=64)
    with pytest.raises(ValueError, match=r"learner\.pp = 3 must divide the model's num_layers = 4"):
        validate_layout(1, 3, 1, 3, num_layers=4)
    with pytest.raises(ValueError, match=r"learner\.tp = 2 must divide the model's vocab_size = 63"):
        validate_layout(2, 1, 1, 2, vocab_size=63)
    with pytest.raises(ValueError, match=r"learner\.dp must be a positive integer"):
        validate_layout(1, 1, 0, 1)


# ------------------------------------------------------------------------------------------------ mapping


@pytest.mark.unit
def test_hf_megatron_round_trip_exact(tiny_model_dir):
    spec = load_spec(tiny_model_dir)
    hf = load_hf_weights(tiny_model_dir)
    mg = hf_to_megatron(hf, spec)
    assert "output_layer.weight" not in mg  # tied
    assert mg["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (256, 128)
    assert mg["decoder.layers.0.mlp.linear_fc1.weight"].shape == (704, 128)
    back = megatron_to_hf(mg, spec)
    assert set(back) == set(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k], hf[k]), k

    # Untied Llama-style GQA (4 query heads per group, no bias), and TE-spec norm names.
    hf2 = random_hf_state_dict(LLAMA_SPEC)
    mg2 = hf_to_megatron(hf2, LLAMA_SPEC)
    assert "output_layer.weight" in mg2 and not any(k.endswith(".bias") for k in mg2)
    te = to_te_norm_names(mg2)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert to_local_spec_norm_names(te).keys() == mg2.keys()
    for sd in (mg2, te):
        back2 = megatron_to_hf(sd, LLAMA_SPEC)
        assert list(back2)[0] == "model.embed_tokens.weight" and list(back2)[-1] == "lm_head.weight"
        assert set(back2) == set(hf2) and all(torch.equal(back2[k], hf2[k]) for k in hf2)


@pytest.mark.unit
def test_qkv_and_fc1_layout():
    spec = LLAMA_SPEC  # 8 heads, 2 groups, head dim 8
    hf = random_hf_state_dict(spec)
    mg = hf_to_megatron(hf, spec)
    d, hpg = spec.kv_channels, spec.heads_per_group
    qkv = mg["decoder.layers.0.self_attention.linear_qkv.weight"].view(spec.num_query_groups, (hpg + 2) * d, -1)
    q = hf["model.layers.0.self_attn.q_proj.weight"].view(spec.num_attention_heads, d, -1)
    k = hf["model.layers.0.self_attn.k_proj.weight"].view(spec.num_query_groups, d, -1)
    v = hf["model.layers.0.self_attn.v_proj.weight"].view(spec.num_query_groups, d, -1)
    for g in range(spec.num_query_groups):
        for j in range(hpg):
            assert torch.equal(qkv[g, j * d : (j + 1) * d], q[g * hpg + j])
        assert torch.equal(qkv[g, hpg * d : (hpg + 1) * d], k[g])
        assert torch.equal(qkv[g, (hpg + 1) * d :], v[g])
    fc1 = mg["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: spec.ffn_hidden_size], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[spec.ffn_hidden_size :], hf["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.unit
def test_mapping_is_strict():
    spec = LLAMA_SPEC
    hf = random_hf_state_dict(spec)
    with pytest.raises(ValueError, match="missing HF tensors.*model.layers.2.mlp.up_proj.weight"):
        hf_to_megatron({k: v for k, v in hf.items() if k != "model.layers.2.mlp.up_proj.weight"}, spec)
    with pytest.raises(ValueError, match="unexpected HF tensors.*model.layers.0.self_attn.q_proj.bias"):
        hf_to_megatron({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, spec)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight: shape"):
        hf_to_megatron({**hf, "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 47)}, spec)


@pytest.mark.unit
def test_tp_shard_unshard_round_trip(tiny_model_dir):
    for spec, hf in (
        (load_spec(tiny_model_dir), load_hf_weights(tiny_model_dir)),
        (LLAMA_SPEC, random_hf_state_dict(LLAMA_SPEC)),
    ):
        mg = hf_to_megatron(hf, spec)
        for name, full in mg.items():
            shards = [shard_for_tp(name, full, 2, r, spec) for r in range(2)]
            kind = tp_split_kind(name)
            if kind == "replicated":
                assert all(torch.equal(s, full) for s in shards), name
            elif kind == "row":
                assert shards[0].shape == (full.shape[0], full.shape[1] // 2), name
            else:
                assert shards[0].shape[0] == full.shape[0] // 2, name
            assert torch.equal(unshard_from_tp(name, shards, spec), full), name
        assert {tp_split_kind(n) for n in mg} >= {"replicated", "row", "qkv", "fc1", "vocab"}

    # fc1 at TP=2: rank r holds [gate_r; up_r]; qkv rank r holds whole query group r.
    spec = LLAMA_SPEC
    hf = random_hf_state_dict(spec)
    mg = hf_to_megatron(hf, spec)
    f2 = spec.ffn_hidden_size // 2
    s1 = shard_for_tp(
        "decoder.layers.0.mlp.linear_fc1.weight", mg["decoder.layers.0.mlp.linear_fc1.weight"], 2, 1, spec
    )
    assert torch.equal(s1[:f2], hf["model.layers.0.mlp.gate_proj.weight"][f2:])
    assert torch.equal(s1[f2:], hf["model.layers.0.mlp.up_proj.weight"][f2:])
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    q1 = shard_for_tp(name, mg[name], 2, 1, spec)
    d, hpg = spec.kv_channels, spec.heads_per_group
    assert torch.equal(q1[: hpg * d], hf["model.layers.0.self_attn.q_proj.weight"][hpg * d :])
    assert torch.equal(q1[hpg * d : (hpg + 1) * d], hf["model.layers.0.self_attn.k_proj.weight"][d:])
    with pytest.raises(ValueError, match="num_query_groups 2 is not divisible by learner.tp = 4"):
        shard_for_tp(name, mg[name], 4, 0, spec)
    assert [pp_layer_offset(r, 4, 2) for r in range(2)] == [0, 2]


# ------------------------------------------------------------------------------------------------ tiny model


@pytest.mark.unit
def test_tokenizer_round_trip(tiny_model_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from qrl_megatron.models.tiny import CHARSET, EOS_TOKEN_ID, PAD_TOKEN_ID

    for tok in (AutoTokenizer.from_pretrained(tiny_model_dir), PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)):
        assert tok.eos_token_id == EOS_TOKEN_ID == 1 and tok.pad_token_id == PAD_TOKEN_ID == 0
        assert tok.bos_token_id is None and len(tok) == 64
        for s in ["12+34=46", "what is 3 * 4? answer: 12", "  a  b ?: -7", CHARSET]:
            ids = tok(s)["input_ids"]
            assert len(ids) == len(s), (s, ids)  # one token per character, no BOS
            assert tok.decode(ids) == s
        ids = tok("1+1=2<|endoftext|>")["input_ids"]
        assert ids[-1] == EOS_TOKEN_ID and tok.decode(ids, skip_special_tokens=True) == "1+1=2"


@pytest.mark.unit
def test_tiny_model_is_deterministic_and_cached(tiny_model_dir, tmp_path):
    from qrl_megatron.models.tiny import TinyModelConfig, build_tiny_model

    other = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (other / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    mtime = (other / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(other, seed=0) == other and (other / "model.safetensors").stat().st_mtime_ns == mtime
    build_tiny_model(other, TinyModelConfig(num_layers=2), seed=0)  # different config: rebuilt
    assert load_spec(other).num_layers == 2
    import json

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert all(t.dtype == torch.bfloat16 for t in load_hf_weights(tiny_model_dir).values())


# ------------------------------------------------------------------------------------------------ Megatron parity


@pytest.fixture(scope="module")
def megatron_tp1(tiny_model_dir):
    """TP=1/PP=1 Megatron model (world size 1, this process) loaded from the tiny HF model, and its logits."""
    from _models_dist_workers import pipeline_logits

    from qrl_megatron.learner.model import build_gpt_model, load_hf_state_dict
    from qrl_megatron.platform import destroy_distributed, init_distributed

    layout = init_distributed(1, 1, seed=0)
    spec = load_spec(tiny_model_dir)
    hf = load_hf_weights(tiny_model_dir)
    model = build_gpt_model(spec, layout, parallel_output=False)
    load_hf_state_dict(model, {k: v.float() for k, v in hf.items()}, spec, layout)
    ids, pos = example_batch(spec.vocab_size)
    model.eval()
    with torch.no_grad():
        direct = model(ids, pos, None)
    scheduled = pipeline_logits(model, ids, pos)
    yield {"layout": layout, "spec": spec, "hf": hf, "model": model, "logits": direct, "scheduled": scheduled}
    destroy_distributed()


@pytest.mark.unit
def test_megatron_tp1_matches_transformers(megatron_tp1, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ids, _ = example_batch(megatron_tp1["spec"].vocab_size)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf_model.eval()(ids).logits
    ours = megatron_tp1["logits"]
    assert ours.shape == ref.shape == (*ids.shape, 64)
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    torch.testing.assert_close(megatron_tp1["scheduled"], ours, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is a no-op with CUDA")
def test_cpu_shim_is_narrow(megatron_tp1):
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.utils as mcore_utils

    from qrl_megatron import platform

    platform.apply_cpu_shim()  # idempotent
    assert platform.is_cpu_shim_applied()
    assert schedules.torch is not torch and schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.distributed is torch.distributed
    assert mcore_utils.torch.cuda.FloatTensor is torch.cuda.FloatTensor
    # the real torch is untouched outside the wrapped megatron functions
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1).cuda()
    with platform.cuda_tensor_compat():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        t = torch.zeros(1)
        assert t.cuda() is t
    assert torch.zeros(1).type() == "torch.FloatTensor" and "type" not in torch.Tensor.__dict__


@pytest.mark.unit
def test_tp1_gather_returns_loaded_weights(megatron_tp1):
    from qrl_megatron.learner.model import gather_hf_state_dict, load_hf_state_dict

    spec, layout, hf = megatron_tp1["spec"], megatron_tp1["layout"], megatron_tp1["hf"]
    got = gather_hf_state_dict(megatron_tp1["model"], spec, layout, dst=0, dtype=torch.bfloat16)
    assert set(got) == set(hf) and all(torch.equal(got[k], hf[k]) for k in hf)
    # strict loading: a missing tensor is named
    broken = {k: v for k, v in hf.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_hf_state_dict(megatron_tp1["model"], broken, spec, layout)


LAYOUTS = [(2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def layout_results(tiny_model_dir) -> dict[tuple[int, int], list[dict]]:
    """(tp, pp) -> per-rank results; one launch per world size, its layouts one after the other."""
    out: dict[tuple[int, int], list[dict]] = {}
    for world in sorted({tp * pp for tp, pp in LAYOUTS}):
        layouts = [(tp, pp) for tp, pp in LAYOUTS if tp * pp == world]
        per_rank = run_distributed(each_layout, world, layout_worker, layouts, str(tiny_model_dir), timeout=360)
        out.update({layout: [r[layout] for r in per_rank] for layout in layouts})
    return out


@pytest.mark.dist
@pytest.mark.parametrize(("tp", "pp"), LAYOUTS, ids=["tp2", "pp2", "tp2pp2"])
def test_layouts_match_tp1(tp, pp, megatron_tp1, layout_results):
    world = tp * pp
    results = layout_results[(tp, pp)]
    ref = megatron_tp1["logits"]
    hf = megatron_tp1["hf"]
    last_stage = [r for r in results if r["layout"].is_last_stage]
    assert len(last_stage) == tp
    for r in results:
        if r["layout"].is_last_stage:
            torch.testing.assert_close(r["logits"], ref, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
        else:
            assert r["logits"] is None
        assert r["exact_everywhere"], r["layout"]
        assert r["exact_last"] is (True if r["layout"].rank == world - 1 else None)
    gathered = results[0]["gathered"]
    assert all(r["gathered"] is None for r in results[1:])
    assert set(gathered) == set(hf) and all(torch.equal(gathered[k], hf[k]) for k in hf)
    # canonical, layout-independent order
    assert results[0]["gathered_names"][:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    assert results[0]["gathered_names"][-1] == "model.norm.weight"
