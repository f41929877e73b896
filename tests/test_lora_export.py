"""QeRL mode's export (qrl_megatron.lora.export): the PEFT adapter folder and the merged HF model, on the tiny model.

* the adapter folder loads in ``peft`` and computes what the merged folder computes in ``transformers`` (and what
  ``W + (alpha/r) B A`` by hand computes);
* wrong tensors are refused by name; a failed write leaves nothing at the destination;
* from an NVFP4 base, the merged weights are the dequantized base + the adapter's delta.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qrl_megatron.lora.adapter import AdapterSpec, adapter_shapes, lora_tensor_name, norm_shapes
from qrl_megatron.lora.export import (
    export_merged,
    load_peft_adapter,
    merge_adapter,
    write_peft_adapter,
)
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec

ADAPTER = AdapterSpec(rank=4, alpha=8.0)
TOKENS = torch.tensor([[2, 5, 9, 17, 3, 30, 11, 40, 8, 21, 6, 12]])


def random_adapter(model_dir: Path, adapter: AdapterSpec = ADAPTER, seed: int = 0) -> dict[str, torch.Tensor]:
    """Nonzero A and B (a fresh PEFT adapter has B = 0, which would make every comparison trivial)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = adapter_shapes(load_spec(model_dir), adapter.rank, adapter.targets)
    # bf16-representable, so the folder's bf16 copy is the same adapter and only the merge rounds
    return {n: (torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16).float() for n, s in shapes.items()}


def hf_logits(model_dir: Path, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """fp32 ``transformers`` logits of the folder's model, with ``state`` loaded over its weights when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if state is not None:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
    with torch.no_grad():
        return model(TOKENS).logits


def read_folder(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(load_hf_weights(model_dir))


def hand_merge(
    base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], adapter: AdapterSpec
) -> dict[str, torch.Tensor]:
    """fp32 ``W + (alpha / r) B A``, written out independently of merge_adapter."""
    out = {k: v.float().clone() for k, v in base.items()}
    for layer in range(load_spec_layers(base)):
        for module, path in (
            ("q_proj", "self_attn.q_proj"),
            ("k_proj", "self_attn.k_proj"),
            ("v_proj", "self_attn.v_proj"),
            ("o_proj", "self_attn.o_proj"),
            ("gate_proj", "mlp.gate_proj"),
            ("up_proj", "mlp.up_proj"),
            ("down_proj", "mlp.down_proj"),
        ):
            if module not in adapter.targets:
                continue
            a = tensors[lora_tensor_name(layer, module, "A")].float()
            b = tensors[lora_tensor_name(layer, module, "B")].float()
            out[f"model.layers.{layer}.{path}.weight"] += adapter.alpha / adapter.rank * b @ a
    return out


def load_spec_layers(state: dict[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))


@pytest.mark.unit
def test_peft_adapter_and_merged_export_agree(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensors = random_adapter(tiny_model_dir)
    adapter_dir = write_peft_adapter(tensors, tmp_path / "adapter", ADAPTER, tiny_model_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    back, spec = load_peft_adapter(adapter_dir, load_spec(tiny_model_dir))
    assert spec == ADAPTER
    assert back.keys() == tensors.keys() and all(back[k].dtype == torch.bfloat16 for k in back)
    assert all(torch.equal(back[k].float(), tensors[k]) for k in tensors)
    assert load_peft_adapter(adapter_dir)[1] == ADAPTER  # structural check only

    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    with torch.no_grad():
        peft_out = peft_model(TOKENS).logits

    base = read_folder(tiny_model_dir)
    hand = hand_merge(base, tensors, ADAPTER)
    hand_out = hf_logits(tiny_model_dir, hand)
    base_out = hf_logits(tiny_model_dir)
    effect = (peft_out - base_out).abs().max().item()
    assert effect > 0.05, effect  # the adapter matters, so the comparisons below mean something
    assert torch.allclose(peft_out, hand_out, atol=1e-5, rtol=0), (peft_out - hand_out).abs().max()

    merged_dir = export_merged(tiny_model_dir, tmp_path / "merged", tensors, ADAPTER)
    assert not (tmp_path / "merged.partial").exists()
    merged = read_folder(merged_dir)
    assert merged.keys() == base.keys() and all(v.dtype == torch.bfloat16 for v in merged.values())
    # the folder is merge_adapter's bf16 result, and that is the fp32 hand merge rounded once
    in_memory = merge_adapter(base, tensors, ADAPTER)
    assert all(torch.equal(merged[k], in_memory[k]) for k in base)
    assert all(torch.equal(merged[k], hand[k].to(torch.bfloat16)) for k in base)
    merged_out = hf_logits(merged_dir)
    gap = (merged_out - peft_out).abs().max().item()
    # bf16 rounding of the merged weights: measured 0.3% of the largest logit
    assert gap < 0.01 * peft_out.abs().max().item() and gap < effect / 20, (gap, effect)
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "generation_config.json").is_file()


@pytest.mark.unit
def test_merge_targets_subset_and_norms(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = AdapterSpec(rank=2, alpha=2.0, targets=("q_proj", "down_proj"), train_norms=True)
    tensors = random_adapter(tiny_model_dir, adapter, seed=1)
    spec = load_spec(tiny_model_dir)
    norms = {n: torch.full(s, 0.5) for n, s in norm_shapes(spec).items()}
    base = read_folder(tiny_model_dir)
    merged = merge_adapter(base, tensors, adapter, norms)
    hand = hand_merge(base, tensors, adapter)
    for name, w in base.items():
        if name in norms:
            assert torch.equal(merged[name], torch.full_like(w, 0.5))
        elif name.endswith(("q_proj.weight", "down_proj.weight")):
            assert merged[name].dtype == w.dtype and torch.equal(merged[name], hand[name].to(w.dtype))
            assert not torch.equal(merged[name], w)
        else:
            assert merged[name] is w
    out = export_merged(tiny_model_dir, tmp_path / "m", tensors, adapter, norms)
    assert all(torch.equal(v, merged[k]) for k, v in read_folder(out).items())
    with pytest.raises(ValueError, match=r"\(train_norms=True\): pass them as norms="):
        merge_adapter(base, tensors, adapter)
    with pytest.raises(
        ValueError, match="trained norms do not match the model: missing model.layers.0.input_layernorm"
    ):
        merge_adapter(base, tensors, adapter, {k: v for k, v in norms.items() if "layers.0.input" not in k})


@pytest.mark.unit
def test_bad_adapter_tensors_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    tensors = random_adapter(tiny_model_dir)
    q_a = lora_tensor_name(1, "q_proj", "A")
    v_b = lora_tensor_name(2, "v_proj", "B")
    base = read_folder(tiny_model_dir)

    missing = {k: v for k, v in tensors.items() if k != q_a}
    wrong_shape = {**tensors, v_b: torch.zeros(3, ADAPTER.rank)}
    unknown = {**tensors, "base_model.model.model.layers.0.mlp.fc.lora_A.weight": torch.zeros(4, 4)}
    cases = [
        (missing, f"missing {q_a}"),
        (wrong_shape, rf"mis-shaped {v_b} \(3, 4\) \(expected \(64, 4\)\)"),
        (unknown, "unexpected base_model.model.model.layers.0.mlp.fc.lora_A.weight"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            write_peft_adapter(bad, tmp_path / "adapter", ADAPTER, tiny_model_dir)
        with pytest.raises(ValueError, match=message):
            merge_adapter(base, bad, ADAPTER)
        with pytest.raises(ValueError, match=message):
            export_merged(tiny_model_dir, tmp_path / "merged", bad, ADAPTER)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="rank 8"):  # a rank-4 adapter under a rank-8 spec: every shape is off
        write_peft_adapter(tensors, tmp_path / "a", AdapterSpec(rank=8, alpha=8.0), tiny_model_dir)
    with pytest.raises(ValueError, match="targets"):
        write_peft_adapter(tensors, tmp_path / "a", AdapterSpec(rank=4, alpha=8.0, targets=("qkv",)), tiny_model_dir)
    with pytest.raises(ValueError, match="is not an NVFP4 checkpoint"):
        export_merged(tiny_model_dir, tmp_path / "m", tensors, ADAPTER, base_format="nvfp4")

    # a folder edited by hand is refused on reading
    good = write_peft_adapter(tensors, tmp_path / "adapter", ADAPTER, tiny_model_dir)
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_peft_adapter(good)


@pytest.mark.unit
def test_failed_write_leaves_no_folder(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    tensors = random_adapter(tiny_model_dir)
    old = write_peft_adapter(tensors, tmp_path / "old_adapter", ADAPTER, tiny_model_dir)
    before = (old / "adapter_model.safetensors").read_bytes()
    calls = 0
    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        real_save(tensors, filename, metadata=metadata)  # the bytes are on disk, then the writer dies
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    for target in ("adapter", "old_adapter"):
        with pytest.raises(OSError, match="injected"):
            write_peft_adapter(tensors, tmp_path / target, ADAPTER, tiny_model_dir)
    with pytest.raises(OSError, match="injected"):
        export_merged(tiny_model_dir, tmp_path / "merged", tensors, ADAPTER, max_shard_bytes=100_000)
    assert calls == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_adapter"]  # no new folder, no partial one
    assert (old / "adapter_model.safetensors").read_bytes() == before  # the previous adapter is intact


@pytest.mark.unit
def test_merged_from_nvfp4_base_is_dequantized_plus_delta(tiny_model_dir: Path, tmp_path: Path) -> None:
    from te_ext.vllm_export import dequantize_checkpoint, export_quantized_checkpoint

    nvfp4_dir = export_quantized_checkpoint(tiny_model_dir, tmp_path / "nvfp4", "nvfp4")
    tensors = random_adapter(tiny_model_dir, seed=2)
    out = export_merged(nvfp4_dir, tmp_path / "merged", tensors, ADAPTER, base_format="nvfp4")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    dequantized = dequantize_checkpoint(read_folder(nvfp4_dir), "nvfp4")
    bf16_base = read_folder(tiny_model_dir)
    assert dequantized.keys() == bf16_base.keys()
    expected = {k: v.to(torch.bfloat16) for k, v in hand_merge(dequantized, tensors, ADAPTER).items()}
    merged = read_folder(out)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dequantized[q].to(torch.bfloat16), bf16_base[q])  # NVFP4 did change the base
    # transformers loads the folder and computes with exactly these weights
    assert torch.equal(hf_logits(out), hf_logits(tiny_model_dir, expected))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        export_merged(nvfp4_dir, tmp_path / "m", tensors, ADAPTER)
