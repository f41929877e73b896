"""Reading HF safetensors folders as published: index validation, lazy full reads, per-rank slices, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _checkpoint_reader_workers import sliced_vs_full_worker
from dist_utils import run_distributed
from safetensors.torch import load_file, save_file

from qrl_megatron.learner.warmstart import write_policy
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.checkpoint_reader import INDEX_NAME, CheckpointReader, StateDictReader
from qrl_megatron.models.families import build_family_model
from qrl_megatron.models.hf_mapping import (
    assemble_megatron_shard,
    check_hf_checkpoint,
    hf_tensor_shapes,
    hf_to_megatron,
    megatron_param_shapes,
    megatron_shard_shape,
    megatron_shard_slices,
    shard_for_tp,
)
from qrl_megatron.models.registry import ModelSpec, load_spec

# Every family of models/families.py: Qwen2 (tied, bias), Qwen2.5 (untied), Qwen3 (q/k norms, head_dim), Llama 3.x
FAMILIES = ["qwen2", "qwen2.5", "qwen3", "llama3", "llama3-tied"]


def _full(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, torch.dtype], Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        (family, dtype): build_family_model(family, root / f"{family}-{str(dtype)[6:]}", dtype=dtype)
        for family in FAMILIES
        for dtype in (torch.bfloat16, torch.float32, torch.float16)
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reader_reads_what_safetensors_reads(family, dtype, family_dirs):
    model_dir = family_dirs[(family, dtype)]
    assert (model_dir / INDEX_NAME).is_file() and len(list(model_dir.glob("*.safetensors"))) > 1
    reader = load_hf_weights(model_dir)
    full = _full(model_dir)
    assert list(reader) == list(json.loads((model_dir / INDEX_NAME).read_text())["weight_map"])
    assert set(reader) == set(full) and len(reader) == len(full)
    assert reader.nbytes == sum(t.numel() * t.element_size() for t in full.values())
    for name, t in full.items():
        got = reader[name]
        assert got.dtype == dtype and torch.equal(got, t), name
    # the whole state dict on demand, for the code that wants it
    assert all(torch.equal(v, full[k]) for k, v in dict(reader).items())


@pytest.mark.unit
def test_single_file_without_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert set(reader) == {"a", "b"} and torch.equal(reader["b"], tensors["b"])
    assert reader.files == [tmp_path / "model.safetensors"]


@pytest.mark.unit
@pytest.mark.parametrize("disk", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_read_slice_rows_columns_and_casts(tmp_path, disk):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(37, 53, generator=g).to(disk)
    save_file({"w": t, "v": t[0].clone()}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    for dim, start, stop in [(0, 0, 37), (0, 5, 20), (1, 0, 53), (1, 13, 40), (1, 52, 53), (0, 3, 3)]:
        for dtype in (None, torch.bfloat16, torch.float32):
            got = reader.read_slice("w", dim, start, stop, dtype=dtype)
            want = t.narrow(dim, start, stop - start).to(dtype or disk)
            assert got.dtype == (dtype or disk) and torch.equal(got, want), (dim, start, stop, dtype)
    # into a preallocated tensor (what the loader does with a parameter), its dtype wins
    out = torch.empty(10, 53, dtype=torch.float32)
    assert reader.read_slice("w", 0, 7, 17, out=out) is out and torch.equal(out, t[7:17].float())
    assert torch.equal(reader.read_slice("v", 0, 2, 9), t[0, 2:9])


@pytest.mark.unit
def test_read_slice_uses_a_bounded_scratch_buffer(tmp_path, monkeypatch):
    """Column slices and casts go through the scratch buffer block by block; tiny blocks exercise the block loop."""
    from qrl_megatron.models import checkpoint_reader

    monkeypatch.setattr(checkpoint_reader, "_SCRATCH_BYTES", 64)
    t = torch.arange(30 * 11, dtype=torch.float32).reshape(30, 11)
    save_file({"w": t}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.read_slice("w", 1, 3, 8), t[:, 3:8])
    assert torch.equal(reader.read_slice("w", 0, 4, 29, dtype=torch.bfloat16), t[4:29].bfloat16())


# ----------------------------------------------------------------------------------------------------------------
# Bad folders: one-line errors naming the file / tensor
# ----------------------------------------------------------------------------------------------------------------


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.unit
def test_missing_shard_names_the_file(tmp_path, family_dirs):
    model_dir = _copy(family_dirs[("qwen2", torch.bfloat16)], tmp_path / "m")
    shard = sorted(model_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_hf_weights(model_dir)
    assert shard.name in _one_line(e) and "missing" in str(e.value)


@pytest.mark.unit
def test_index_naming_a_tensor_not_in_its_shard(tmp_path, family_dirs):
    model_dir = _copy(family_dirs[("qwen2", torch.bfloat16)], tmp_path / "m")
    index = json.loads((model_dir / INDEX_NAME).read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = first_shard
    (model_dir / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        CheckpointReader(model_dir)
    message = _one_line(e)
    assert "model.layers.0.self_attn.extra.weight" in message and first_shard in message


@pytest.mark.unit
def test_index_placing_a_tensor_in_the_wrong_shard(tmp_path, family_dirs):
    model_dir = _copy(family_dirs[("qwen2", torch.bfloat16)], tmp_path / "m")
    index = json.loads((model_dir / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (model_dir / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        CheckpointReader(model_dir)
    assert name in _one_line(e) and "stale" in str(e.value)


@pytest.mark.unit
def test_duplicate_tensors(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError) as e:
        CheckpointReader(tmp_path)
    assert "tensor a" in _one_line(e) and "x.safetensors" in str(e.value) and "y.safetensors" in str(e.value)
    # the same tensor twice in one index
    (tmp_path / "y.safetensors").unlink()
    (tmp_path / INDEX_NAME).write_text(
        '{"weight_map": {"a": "x.safetensors", "b": "x.safetensors", "a": "x.safetensors"}}'
    )
    with pytest.raises(ValueError) as e:
        CheckpointReader(tmp_path)
    assert "'a' appears twice" in _one_line(e) and INDEX_NAME in str(e.value)


@pytest.mark.unit
def test_truncated_shard(tmp_path):
    save_file({"a": torch.zeros(100)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError) as e:
        CheckpointReader(tmp_path)
    assert "truncated" in _one_line(e) and str(path) in str(e.value)


@pytest.mark.unit
def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in _one_line(e)


def _rewrite_tensor(model_dir: Path, name: str, tensor: torch.Tensor) -> Path:
    """Replace ``name`` in its shard (the index stays consistent: same file)."""
    shard = model_dir / json.loads((model_dir / INDEX_NAME).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


@pytest.mark.unit
def test_wrong_shape_names_tensor_and_file(tmp_path, family_dirs):
    from qrl_megatron.learner.model import build_gpt_model, load_hf_state_dict
    from qrl_megatron.platform import init_distributed

    model_dir = _copy(family_dirs[("qwen2.5", torch.bfloat16)], tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    shard = _rewrite_tensor(model_dir, name, torch.zeros(100, 64, dtype=torch.bfloat16))
    spec = load_spec(model_dir)
    reader = load_hf_weights(model_dir)  # the folder itself is consistent
    with pytest.raises(ValueError) as e:
        check_hf_checkpoint({n: reader.shape(n) for n in reader}, spec, reader.where)
    message = _one_line(e)
    assert name in message and str(shard) in message and "(100, 64)" in message
    layout = init_distributed(1, 1, 1, seed=0)
    model = build_gpt_model(spec, layout)
    with pytest.raises(ValueError, match=name) as e:
        load_hf_state_dict(model, reader, spec, layout)
    _one_line(e)


@pytest.mark.unit
def test_missing_and_unknown_tensors(family_dirs):
    model_dir = family_dirs[("qwen2.5", torch.bfloat16)]
    spec = load_spec(model_dir)
    shapes = hf_tensor_shapes(spec)
    missing = {k: v for k, v in shapes.items() if k != "model.layers.2.self_attn.k_proj.bias"}
    with pytest.raises(ValueError) as e:
        check_hf_checkpoint(missing, spec)
    assert "model.layers.2.self_attn.k_proj.bias is missing" in _one_line(e)
    extra = {**shapes, "model.layers.9.input_layernorm.weight": (64,), "model.layers.10.input_layernorm.weight": (64,)}
    with pytest.raises(ValueError) as e:
        check_hf_checkpoint(extra, spec)
    assert "model.layers.9.input_layernorm.weight" in _one_line(e) and "(and 1 more)" in str(e.value)
    # buffers older checkpoints carry are recomputed, not an error
    check_hf_checkpoint({**shapes, "model.layers.0.self_attn.rotary_emb.inv_freq": (8,)}, spec)


# ----------------------------------------------------------------------------------------------------------------
# Per-rank slices == shard_for_tp(hf_to_megatron(full))
# ----------------------------------------------------------------------------------------------------------------


def _spec(tied: bool, bias: bool, qk_norm: bool = False) -> ModelSpec:
    # 8 heads in 4 query groups, FFN and vocab divisible by 4: TP = 1, 2, 4 all valid. qk_norm: Qwen3's per-head
    # q/k norms, with an explicit head_dim that is not hidden/heads.
    return ModelSpec(
        arch="qwen3" if qk_norm else "qwen2" if bias else "llama",
        vocab_size=96,
        hidden_size=64,
        num_layers=3,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=48,
        max_position_embeddings=64,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_word_embeddings=tied,
        qkv_bias=bias,
        head_dim=16 if qk_norm else None,
        qk_norm=qk_norm,
    )


def _random_hf(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in hf_tensor_shapes(spec).items()}


def _assert_slices_match(spec: ModelSpec, reader, full: dict[str, torch.Tensor], tp: int, dtype: torch.dtype) -> None:
    shapes = {n: reader.shape(n) for n in reader}
    megatron = hf_to_megatron(full, spec)
    names = list(megatron_param_shapes(spec))
    if spec.tie_word_embeddings:  # the last stage's copy (PP > 1) reads the embedding
        megatron["output_layer.weight"] = megatron["embedding.word_embeddings.weight"]
        names.append("output_layer.weight")
    for rank in range(tp):
        for name in names:
            slices = megatron_shard_slices(name, spec, tp, rank, shapes)
            pieces = [reader.read_slice(s.name, s.dim, s.start, s.stop, dtype=dtype) for s in slices]
            got = assemble_megatron_shard(name, pieces, spec, tp)
            want = shard_for_tp(name, megatron[name], tp, rank, spec).to(dtype)
            assert megatron_shard_shape(slices, shapes) == tuple(want.shape), (name, tp, rank)
            assert torch.equal(got, want), (name, tp, rank)


@pytest.mark.unit
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    ("tied", "bias"), [(True, True), (False, True), (False, False)], ids=["tied-bias", "bias", "plain"]
)
def test_slices_equal_shard_for_tp(tp, tied, bias):
    spec = _spec(tied, bias)
    full = _random_hf(spec)
    _assert_slices_match(spec, StateDictReader(full), full, tp, torch.float32)


@pytest.mark.unit
@pytest.mark.parametrize("disk", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_file_slices_equal_shard_for_tp(family, disk, family_dirs):
    """From the sharded files, cast per slice: the same bytes as casting the whole shard."""
    model_dir = family_dirs[(family, disk)]
    spec = load_spec(model_dir)
    for tp in (1, 2):
        _assert_slices_match(spec, load_hf_weights(model_dir), _full(model_dir), tp, torch.bfloat16)


@pytest.mark.unit
def test_tied_lm_head_copy_must_equal_the_embedding(tmp_path, family_dirs):
    from qrl_megatron.learner.model import build_gpt_model, load_hf_state_dict
    from qrl_megatron.platform import init_distributed

    src = family_dirs[("qwen2", torch.bfloat16)]
    spec = load_spec(src)
    layout = init_distributed(1, 1, 1, seed=0)
    model = build_gpt_model(spec, layout)
    full = _full(src)
    load_hf_state_dict(model, {**full, "lm_head.weight": full["model.embed_tokens.weight"].clone()}, spec, layout)
    with pytest.raises(ValueError, match="lm_head.weight differs") as e:
        load_hf_state_dict(
            model, {**full, "lm_head.weight": torch.zeros_like(full["model.embed_tokens.weight"])}, spec, layout
        )
    _one_line(e)


# ----------------------------------------------------------------------------------------------------------------
# Warm-start folder, and the multi-process load
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_warmstart_policy_folder_is_consistent(tmp_path, family_dirs):
    """A sharded base's index is not copied next to the policy's single weights file (it would name the base's
    shards); the written folder reads back exactly."""
    base = family_dirs[("qwen2", torch.bfloat16)]
    weights = {k: v + 1 for k, v in _full(base).items()}
    out = tmp_path / "policy"
    write_policy(out, base, weights, {"steps": 0})
    assert not (out / INDEX_NAME).exists() and [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    reader = load_hf_weights(out)
    assert set(reader) == set(weights) and all(torch.equal(reader[k], v) for k, v in weights.items())


@pytest.mark.dist
@pytest.mark.parametrize(
    ("tp", "pp", "families"),
    [(2, 1, ["qwen2", "llama3-tied"]), (2, 2, ["qwen2", "qwen2.5", "qwen3"])],
    ids=["tp2", "tp2pp2"],
)
def test_sliced_load_matches_full_load(tp, pp, families, family_dirs):
    model_dirs = [str(family_dirs[(family, torch.bfloat16)]) for family in families]
    # generous: four spawned ranks importing megatron on a shared 2-core machine took up to 3 minutes
    results = run_distributed(sliced_vs_full_worker, tp * pp, tp, pp, model_dirs, timeout=600)
    for family, model_dir in zip(families, model_dirs, strict=True):
        reports = [r["report"][model_dir] for r in results]
        assert all(r["compared"] > 0 for r in reports), family
        assert [r["differ"] for r in reports] == [[]] * (tp * pp), family


@pytest.mark.unit
def test_warmstart_key_digests_every_shard(tmp_path, family_dirs):
    """The warm-start cache key follows the base's weights' bytes, not its path: of the single file, or of the index
    and every shard it names (a sharded base used to key on its path only)."""
    from qrl_megatron.learner.config import WarmStartConfig
    from qrl_megatron.learner.warmstart import warmstart_key

    def key(base: Path) -> str:
        return warmstart_key(WarmStartConfig(), "fp32", 0, base, {"model": {}, "task": {}})

    sharded = _copy(family_dirs[("qwen2", torch.bfloat16)], tmp_path / "sharded")
    assert key(sharded) == key(_copy(sharded, tmp_path / "sharded-copy"))
    before = key(sharded)
    _rewrite_tensor(sharded, "model.norm.weight", torch.ones(64, dtype=torch.bfloat16))
    assert key(sharded) != before

    single = tmp_path / "single"
    write_policy(single, sharded, _full(sharded), {})
    assert key(single) == key(_copy(single, tmp_path / "single-copy")) != key(sharded)
    write_policy(single, sharded, {k: v * 2 for k, v in _full(sharded).items()}, {})
    assert key(single) != key(tmp_path / "single-copy")
