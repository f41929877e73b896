"""The complete HF export: the streaming writer, layout invariance, and qrl-export from a TP2xPP2 checkpoint.

unit: the writer (shards within the size limit, an index that matches the files, the dtype, config / generation
config / tokenizer, nothing left behind on failure), checkpoint and CLI errors, and a TP=1 export that
transformers loads with the learner's logits. dist: TP=2 and TP2xPP2 exports of the same weights are
byte-identical to TP=1's. e2e: a TP2xPP2 learner's checkpoint -> `qrl-export` -> transformers and the real vLLM
CPU engine agree with the learner's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _export_dist_workers import SEQ_LEN, checkpoint_worker, export_worker, perturbed_weights
from _models_dist_workers import example_batch
from dist_utils import run_distributed

from qrl_megatron.hf_export import INDEX_FILE, HFFolderWriter, base_dtype, expected_hf_names
from qrl_megatron.models.registry import load_spec

# Megatron fp32 vs transformers fp32 on the same (bf16-exact) weights: only summation order differs.
LOGITS_ATOL = 2e-4
# vLLM computes in bf16: its prompt logprobs sit within bf16 noise of an fp32 reference (tests/test_rollout.py).
VLLM_LOGPROB_ATOL = 0.03


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder, through its index (and check the index against the files)."""
    from safetensors import safe_open

    index = json.loads((folder / INDEX_FILE).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / fname), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                assert index["weight_map"][name] == fname, f"{name} is in {fname}, the index says otherwise"
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(ids).logits


# ------------------------------------------------------------------------------------------------------ writer


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_writer_shards_index_dtype_and_metadata(tiny_model_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    weights = perturbed_weights(tiny_model_dir)
    limit = 150_000
    out = tmp_path / "final"
    with HFFolderWriter(out, tiny_model_dir, dtype=dtype, max_shard_bytes=limit) as writer:
        for name, t in weights.items():
            writer.add(name, t)
        assert not out.exists() and writer.partial.is_dir()  # nothing looks complete before finish()
        writer.finish(weights)
    assert not writer.partial.exists()

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    got = read_folder(out)
    for s in shards:  # a shard passes the limit only when it holds one tensor that alone does
        with safe_open(str(s), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
        if len(sizes) > 1:
            assert s.stat().st_size <= limit + 10_000  # + the safetensors header
    assert set(got) == set(weights)
    for name, t in weights.items():
        assert got[name].dtype == dtype
        assert torch.equal(got[name], t.to(dtype)), name

    config = json.loads((out / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == str(dtype).removeprefix("torch.")
    assert (out / "generation_config.json").is_file()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tiny_model_dir / f).read_bytes()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the tiny model's build marker stays behind
    tok, ref = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tok("12+34=")["input_ids"] == ref("12+34=")["input_ids"]


@pytest.mark.unit
def test_writer_failure_leaves_nothing_and_keeps_the_old_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    weights = perturbed_weights(tiny_model_dir)
    out = tmp_path / "final"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="boom"), HFFolderWriter(out, tiny_model_dir, max_shard_bytes=50_000) as w:
        for i, (name, t) in enumerate(weights.items()):
            w.add(name, t)
            if i == 10:
                raise RuntimeError("boom")
    assert not w.partial.exists() and (out / "old.txt").is_file()

    names = list(weights)
    missing = pytest.raises(ValueError, match=r"incomplete: missing tensors \['model.norm.weight'\]")
    with missing, HFFolderWriter(out, tiny_model_dir) as w:
        for name in names:
            if name != "model.norm.weight":
                w.add(name, weights[name])
        w.finish(names)
    assert not w.partial.exists() and (out / "old.txt").is_file()

    with HFFolderWriter(out, tiny_model_dir) as w:  # a complete export replaces the old folder
        for name in names:
            w.add(name, weights[name])
        with pytest.raises(ValueError, match="already written"):
            w.add(names[0], weights[names[0]])
        w.finish(names)
    assert not (out / "old.txt").exists() and (out / INDEX_FILE).is_file()


@pytest.mark.unit
def test_base_dtype_generation_config_and_missing_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (base / "config.json").write_text(json.dumps(config))
    assert base_dtype(base) == torch.bfloat16  # no dtype recorded: bf16, what hubs publish
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    assert base_dtype(base) == torch.float32
    (base / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    assert base_dtype(base) == torch.float16

    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        HFFolderWriter(tmp_path / "out", base)
    (base / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (base / "tokenizer_config.json").write_bytes((tiny_model_dir / "tokenizer_config.json").read_bytes())
    weights = perturbed_weights(tiny_model_dir)
    with HFFolderWriter(tmp_path / "out", base) as w:  # fp16 from the base config; generation config derived
        for name, t in weights.items():
            w.add(name, t)
        w.finish(weights)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.unit
def test_qrl_export_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qrl_megatron.export_cli import EXIT_BAD_INPUT, main

    def error(*argv: str) -> str:
        assert main(list(argv)) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip()
        assert err.startswith("qrl-export: error: ") and "\n" not in err, err
        return err

    assert "does not exist" in error(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "plain").mkdir()
    assert "neither a checkpoint nor a run folder" in error(str(tmp_path / "plain"), str(tmp_path / "out"))
    (tmp_path / "run" / "checkpoint.partial").mkdir(parents=True)
    assert "never completed" in error(str(tmp_path / "run"), str(tmp_path / "out"))
    assert "not a complete checkpoint" in error(str(tmp_path / "run" / "checkpoint.partial"), str(tmp_path / "out"))
    old = tmp_path / "old"
    old.mkdir()
    (old / "COMPLETE").write_text("{}")
    assert "has no meta.json" in error(str(old), str(tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "not an empty folder" in error(str(old), str(tmp_path / "full"))
    with pytest.raises(SystemExit):
        main([str(old), str(tmp_path / "out"), "--format", "int4"])


# ------------------------------------------------------------------------------------- TP=1 export in-process


@pytest.mark.unit
@pytest.mark.parametrize("family", ["tiny", "qwen3", "llama3", "llama3-tied"])
def test_tp1_export_matches_megatron_logits(
    family: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A TP=1 model's export: gather and stream agree, and transformers reproduces Megatron's logits."""
    from _models_dist_workers import pipeline_logits

    from qrl_megatron.hf_export import export_policy
    from qrl_megatron.learner.model import build_gpt_model, gather_hf_state_dict, load_hf_state_dict
    from qrl_megatron.platform import destroy_distributed, init_distributed

    model_dir = tiny_model_dir if family == "tiny" else _family_dir(tmp_path_factory, family)
    out = tmp_path_factory.mktemp(f"tp1-{family}") / "final"
    layout = init_distributed(1, 1, seed=0)
    try:
        spec = load_spec(model_dir)
        model = build_gpt_model(spec, layout, parallel_output=False)
        weights = perturbed_weights(model_dir)
        load_hf_state_dict(model, weights, spec, layout)
        ids, pos = example_batch(spec.vocab_size)
        ours = pipeline_logits(model, ids, pos)
        export_policy(model, spec, layout, out, model_dir, max_shard_bytes=200_000)
        gathered = gather_hf_state_dict(model, spec, layout, dtype=torch.bfloat16)
    finally:
        destroy_distributed()
    exported = read_folder(out)
    assert gathered is not None and set(exported) == set(expected_hf_names(spec))
    assert set(gathered) == set(exported) == set(weights)  # tied: no lm_head in either
    for name, t in exported.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, gathered[name]) and torch.equal(t.float(), weights[name])
    assert (
        json.loads((out / "config.json").read_text())["architectures"]
        == json.loads((model_dir / "config.json").read_text())["architectures"]
    )
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- layout invariance


def _family_dir(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    from qrl_megatron.models.families import build_family_model

    return build_family_model(family, tmp_path_factory.mktemp(f"family-{family}") / "model")


EXPORT_FAMILIES = ["qwen2", "qwen2.5", "qwen3", "llama3"]
EXPORT_LAYOUTS = [(1, 1), (2, 1), (2, 2)]
SHARD_BYTES = 40_000  # several shards, so shard boundaries are compared too


@pytest.fixture(scope="module")
def layout_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[tuple[int, int], Path]]]:
    """family -> (model folder, layout -> exported folder); one launch per layout, every family in it."""
    models = {family: _family_dir(tmp_path_factory, family) for family in EXPORT_FAMILIES}
    out = tmp_path_factory.mktemp("layout-exports")
    folders: dict[str, dict[tuple[int, int], Path]] = {family: {} for family in EXPORT_FAMILIES}
    for tp, pp in EXPORT_LAYOUTS:
        jobs = [(str(models[f]), str(out / f / f"tp{tp}pp{pp}")) for f in EXPORT_FAMILIES]
        results = run_distributed(export_worker, tp * pp, tp, pp, jobs, SHARD_BYTES, timeout=600)
        for family, (_, out_dir) in zip(EXPORT_FAMILIES, jobs, strict=True):
            exported = read_folder(Path(out_dir))
            gathered = results[0]["gathered"][out_dir]  # one gather mechanism: the collected stream is the written one
            assert set(gathered) == set(exported) and all(torch.equal(gathered[k], exported[k]) for k in exported)
            assert all(r["gathered"][out_dir] is None for r in results[1:])
            folders[family][(tp, pp)] = Path(out_dir)
    return {family: (models[family], folders[family]) for family in EXPORT_FAMILIES}


@pytest.mark.dist
@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_export_is_byte_identical_across_layouts(family: str, layout_exports: dict) -> None:
    """TP=2 / TP2xPP2 exports of the same weights are the TP=1 export, file for file, byte for byte."""
    model_dir, folders = layout_exports[family]
    reference = folders[(1, 1)]
    files = sorted(p.name for p in reference.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    for layout, folder in folders.items():
        assert sorted(p.name for p in folder.iterdir()) == files, layout
        for name in files:
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), f"{layout}: {name} differs"
    weights = perturbed_weights(model_dir)
    exported = read_folder(reference)
    assert set(exported) == set(weights) and all(torch.equal(exported[k].float(), weights[k]) for k in weights)


# ----------------------------------------------------------------------------------------------------- e2e


@pytest.mark.e2e
def test_qrl_export_from_tp2pp2_checkpoint_loads_in_transformers_and_vllm(tiny_model_dir: Path, tmp_path: Path) -> None:
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    run = tmp_path / "run"
    results = run_distributed(checkpoint_worker, 4, 2, 2, str(tiny_model_dir), str(run), timeout=600)
    learner_logits = next(r["logits"] for r in results if r["logits"] is not None)
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 2, "pp": 2, "dp": 1} and meta["base_model"] == str(tiny_model_dir.resolve())
    assert (run / "checkpoint" / "hf" / "tokenizer.json").is_file()

    out = tmp_path / "exported"
    exe = Path(sys.executable).with_name("qrl-export")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "qrl_megatron.export_cli"]
    proc = subprocess.run([*cmd, str(run), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qrl-export: wrote" in proc.stdout
    # the one-process TP=1 re-export of the TP2xPP2 checkpoint is what the run itself wrote to final/
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (run / "final").iterdir())
    for f in out.iterdir():
        assert f.read_bytes() == (run / "final" / f.name).read_bytes(), f.name

    ids, _ = example_batch(load_spec(out).vocab_size)
    hf = hf_logits(out, ids)
    torch.testing.assert_close(hf, learner_logits, atol=LOGITS_ATOL, rtol=0)
    gap_hf = (hf - learner_logits).abs().max().item()

    sequences = [row.tolist() for row in ids[:3]]
    engine = VLLMEngine(str(out), RolloutConfig(kv_cache_mib=64), seed=0, max_model_len=64)
    try:
        got = engine.prompt_logprobs(sequences)
    finally:
        engine.close()
    logp = torch.log_softmax(learner_logits.float(), dim=-1)
    gaps = [
        abs(a - logp[b, t - 1, seq[t]].item())
        for b, seq in enumerate(sequences)
        for a, t in zip(got[b], range(1, len(seq)), strict=True)
    ]
    print(f"max |logit| diff transformers vs learner {gap_hf:.2e}; max logprob gap vLLM vs learner {max(gaps):.4f}")
    assert max(gaps) < VLLM_LOGPROB_ATOL
    assert ids.shape[1] == SEQ_LEN


@pytest.mark.unit
def test_rollout_format_folder_from_an_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`qrl-export --format nvfp4`'s second half: te_ext's compressed-tensors folder, written atomically."""
    from qrl_megatron.hf_export import export_rollout_format
    from te_ext.vllm_export import dequantized_state_dict

    weights = perturbed_weights(tiny_model_dir)
    with HFFolderWriter(tmp_path / "bf16", tiny_model_dir, max_shard_bytes=100_000) as w:
        for name, t in weights.items():
            w.add(name, t)
        w.finish(weights)
    out = export_rollout_format(tmp_path / "bf16", tmp_path / "nvfp4", "nvfp4")
    assert not (tmp_path / "nvfp4.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    packed = {k for k in read_folder(out) if k.endswith("weight_packed")} if (out / INDEX_FILE).is_file() else set()
    if not packed:  # one file, no index
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            packed = {k for k in f.keys() if k.endswith("weight_packed")}  # noqa: SIM118
    assert "model.layers.0.self_attn.q_proj.weight_packed" in packed
    # what the engine computes with: the export's weights after NVFP4 quantize -> dequantize
    deq = dequantized_state_dict(tmp_path / "bf16", "nvfp4")
    q = deq["model.layers.0.self_attn.q_proj.weight"]
    ref = weights["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < (q - ref).abs().max() < 0.5 * ref.abs().max()
    with pytest.raises(ValueError, match="rollout format must be one of"):
        export_rollout_format(tmp_path / "bf16", tmp_path / "x", "int4")


@pytest.mark.unit
def test_run_export_formats_config() -> None:
    from qrl_megatron.config import ConfigError, load_config

    assert load_config(None, []).run.export_formats == []
    assert load_config(None, ["run.export_formats=[nvfp4,fp8]"]).run.export_formats == ["nvfp4", "fp8"]
    with pytest.raises(ConfigError, match=r"run.export_formats='int4' is not allowed.*did you mean 'int8'"):
        load_config(None, ["run.export_formats=[int4]"])
