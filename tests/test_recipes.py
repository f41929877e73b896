"""The model recipes in configs/, checked offline (no GPU, no download).

Each recipe names a hub model; its published ``config.json`` is stored in ``configs/hf_configs/<name>.json``
(tests cannot download). From it: the Megatron model the learner would build, constructed on the meta device (no
memory), has exactly the parameter count of the ``transformers`` model of the same config (also on meta), and that
count is within 1% of the model card's; the recipe's learner layout is valid for the GPUs its header names, and its
engine TP is one vLLM can shard the model over. Counts come from the models built, never from a formula.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from qrl_megatron.config import QRLConfig, load_config
from qrl_megatron.platform import validate_layout

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
HF_CONFIGS = CONFIGS / "hf_configs"

# recipe -> published parameter count (the model cards; Qwen2.5-0.5B's card says 0.49B)
PUBLISHED = {
    "qwen2.5_0.5b": 0.49e9,
    "qwen2.5_1.5b": 1.54e9,
    "qwen2.5_7b": 7.62e9,
    "qwen2.5_14b": 14.77e9,
    "qwen2.5_32b": 32.76e9,
    "qwen2.5_32b_qerl": 32.76e9,
    "qwen2.5_32b_1gpu": 32.76e9,
    "qwen2.5_72b": 72.7e9,
    "qwen3_8b": 8.19e9,
    "qwen3_32b": 32.8e9,
    "llama3.1_8b": 8.03e9,
    "llama3.1_70b": 70.6e9,
}
# Keys of the published config.json that the learner, the count and the layout read.
HF_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
    "rope_theta",
    "max_position_embeddings",
    "rms_norm_eps",
    "torch_dtype",
)


def recipe_path(recipe: str) -> Path:
    return CONFIGS / f"{recipe}.yaml"


def recipe_cfg(recipe: str) -> QRLConfig:
    return load_config(recipe_path(recipe))  # the project's loader: merge onto the typed defaults, validate


def hf_config(cfg: QRLConfig) -> dict[str, Any]:
    """The stored published config.json of the recipe's hub model (``org/name`` -> ``hf_configs/name.json``)."""
    return json.loads((HF_CONFIGS / f"{cfg.model.source.split('/')[1]}.json").read_text())


def hardware_line(recipe: str) -> str:
    """What follows ``# Hardware:`` in the recipe's header, e.g. ``4 nodes x 8 H100 80GB (32 GPUs).``"""
    lines = recipe_path(recipe).read_text().splitlines()
    return next(x for x in lines if x.startswith("# Hardware:")).removeprefix("# Hardware:").strip()


def hardware(recipe: str) -> tuple[int, int]:
    """(GPUs in all, GPUs per node) from the recipe's ``# Hardware: ... (N GPUs)`` header line."""
    line = hardware_line(recipe)
    total = re.search(r"\((\d+) GPUs?\)", line)
    assert total, f"{recipe}: the Hardware line must end with '(N GPUs)': {line}"
    nodes = re.search(r"(\d+) nodes x (\d+) ", line)
    per_node = int(nodes.group(2)) if nodes else int(total.group(1))
    if nodes:
        assert int(nodes.group(1)) * per_node == int(total.group(1)), line
    return int(total.group(1)), per_node


def test_every_recipe_is_covered() -> None:
    model_recipes = {p.stem for p in CONFIGS.glob("*.yaml")} - {"tiny_cpu", "tiny_cpu_qerl"}
    assert model_recipes == set(PUBLISHED)
    used = {recipe_cfg(r).model.source.split("/")[1] for r in PUBLISHED}
    assert used == {p.stem for p in HF_CONFIGS.glob("*.json")}, "one stored HF config per recipe, none unused"


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_loads_and_names_its_hub_model(recipe: str) -> None:
    cfg = recipe_cfg(recipe)
    org, name = cfg.model.source.split("/")
    assert org in ("Qwen", "meta-llama")
    hf = hf_config(cfg)
    assert all(k in hf for k in HF_KEYS), sorted(set(HF_KEYS) - set(hf))
    family = {"qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama3.1": "LlamaForCausalLM"}
    assert hf["architectures"] == [family[recipe.split("_")[0]]]
    header = recipe_path(recipe).read_text().split("\nseed:")[0]
    for part in ("# Hardware:", "# Layout:", "# Rollout:", "# Mode:"):
        assert part in header, f"{recipe}: header lacks {part!r}"
    # full-parameter RL on a pretrained model: a small learning rate, bf16 compute, no tiny-model warm-start
    assert cfg.learner.lr <= 1e-5 and cfg.learner.precision == "bf16" and not cfg.warmstart.enabled


# ---------------------------------------------------------------------------------------- parameter counts
@pytest.fixture(scope="module")
def one_rank_layout():
    """A one-process gloo world with megatron's parallel state (TP=PP=1: every parameter on this rank)."""
    from qrl_megatron.platform import destroy_distributed, init_distributed

    yield init_distributed(1, 1, seed=0)
    destroy_distributed()


def megatron_count(hf: dict[str, Any], layout: Any) -> int:
    import qrl_megatron.learner.model as learner_model
    from qrl_megatron.models.registry import spec_from_hf_config

    spec = spec_from_hf_config(hf)
    with torch.device("meta"):
        model = learner_model.build_gpt_model(spec, layout, config_overrides={"perform_initialization": False})
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}, "the model must not allocate memory"
    return sum(p.numel() for p in params)


def transformers_count(hf: dict[str, Any]) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == hf["architectures"][0]
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_parameter_count(recipe: str, one_rank_layout: Any) -> None:
    hf = hf_config(recipe_cfg(recipe))
    count = megatron_count(hf, one_rank_layout)
    assert count == transformers_count(hf)
    published = PUBLISHED[recipe]
    assert abs(count - published) / published < 0.01, f"{recipe}: {count / 1e9:.3f}B vs published {published / 1e9}B"


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_layout_fits_its_hardware(recipe: str) -> None:
    cfg = recipe_cfg(recipe)
    hf = hf_config(cfg)
    gpus, per_node = hardware(recipe)
    # the layout check reads the model's dimensions; taken from config.json directly so it needs no registry support
    shape = SimpleNamespace(
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_key_value_heads"],
        vocab_size=hf["vocab_size"],
        ffn_hidden_size=hf["intermediate_size"],
    )
    learner = cfg.learner
    assert validate_layout(learner.tp, learner.pp, learner.dp, gpus, model=shape) == learner.dp
    assert learner.world_size == gpus, f"{recipe}: the learner must use every GPU the recipe names"
    assert learner.tp <= per_node, "TP stays inside a node (NVLink)"
    assert learner.distributed_optimizer == (learner.dp > 1)
    # vLLM shards query heads evenly and KV heads evenly or replicated (engine TP above the KV head count)
    rtp, heads, kv = cfg.rollout.tp, hf["num_attention_heads"], hf["num_key_value_heads"]
    assert rtp <= per_node and gpus % rtp == 0
    assert heads % rtp == 0 and (kv % rtp == 0 or rtp % kv == 0), (recipe, rtp, heads, kv)
    # the completion budget leaves room for the prompt inside the model's positions
    assert cfg.rollout.max_new_tokens + 512 <= hf["max_position_embeddings"]
    if cfg.rollout.quant != "bf16" and not cfg.learner.lora.enabled:  # QeRL: learner and engine share the base
        assert cfg.algo.correction in ("tis", "mis", "acr"), "a quantized engine needs a rollout correction"


def test_help_config_lists_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    from qrl_megatron.cli import main

    assert main(["--help-config"]) == 0
    listing = capsys.readouterr().out.partition("\n\nrecipes")[2]
    for recipe in [*PUBLISHED, "tiny_cpu"]:
        line = next((x for x in listing.splitlines() if x.split()[:1] == [f"{recipe}.yaml"]), None)
        assert line, f"{recipe}.yaml not listed"
        if recipe != "tiny_cpu":
            assert hardware_line(recipe).rstrip(".") in line, line


def test_readme_recipes_table() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.partition("\n## Recipes\n")[2].partition("\n## ")[0]
    assert section, "README.md needs a '## Recipes' section"
    for recipe in PUBLISHED:
        assert f"configs/{recipe}.yaml" in section, recipe


# ------------------------------------------------------------------------------------------- memory plans
REFUSED = {"qwen2.5_32b_1gpu"}  # full-parameter 32B on one 80 GB GPU: exists to show the refusal


def test_every_recipe_fits_its_gpus_but_the_refused_one(one_rank_layout: Any) -> None:
    """The memory plan (qrl_megatron/plan.py) of each recipe against its 80 GB GPUs: accepted, except the recipe
    that exists to be refused (its header says so)."""
    from qrl_megatron.plan import make_plan, model_spec

    for recipe in sorted(PUBLISHED):
        cfg = recipe_cfg(recipe)
        plan = make_plan(cfg, model_spec(cfg), one_rank_layout, recipe)
        assert plan.fits == (recipe not in REFUSED), f"{recipe}: peak {plan.peak / 1e9:.1f} GB\n{plan.table()}"
        if recipe in REFUSED:
            assert "REFUSES" in recipe_path(recipe).read_text().split("\nseed:")[0]
