"""QeRL's adapter-only sync on a real vLLM engine: the LoRA adapter swapped in memory, checked against transformers.

One module-scoped engine serving the tiny model with a LoRA adapter (a start is ~30 s of CPU); every test pushes
the adapter it needs first. References are float32 transformers forwards of the base with the adapter merged
(W + alpha/r * B @ A, from the same bf16 A and B the engine gets); the engine runs bf16 (its LoRA path too: the gap
grows with the delta, 0.02 nats at a 1-nat effect, 0.004 at the 0.75-nat one used here), so each comparison is held
to the engine's own gap on the bare base (the zero adapter), plus a small floor.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from qrl_megatron.bridge.checksum import WeightVerificationError, checksums
from qrl_megatron.lora.adapter import AdapterSpec, adapter_shapes, lora_tensor_name, norm_shapes
from qrl_megatron.models.registry import ModelSpec, load_spec
from qrl_megatron.rollout.lora_swap import AdapterUpdateError

pytestmark = pytest.mark.e2e

ADAPTER = AdapterSpec(rank=8, alpha=16.0)  # alpha / r = 2: folding it into bf16 lora_B rounds nothing
TEXTS = ["what is 12+34? answer: 46", "compute 7*8 = 56 and 99-1 = 98", "q: 3+4+5 ? a: 12", "x 81-27 = 54 ok"]
FLOOR = 5e-3  # nats, on top of the engine's bare-base gap


def random_adapter(spec: ModelSpec, seed: int, b_scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A PEFT-named bf16 adapter with a nonzero delta (b_scale=0: PEFT's initial adapter, B = 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in adapter_shapes(spec, ADAPTER.rank, ADAPTER.targets).items():
        std = 1 / math.sqrt(shape[1]) if ".lora_A." in name else b_scale / math.sqrt(shape[1])
        out[name] = (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
    return out


class Reference:
    """float32 transformers forward of the base with an adapter merged and, optionally, other norms."""

    def __init__(self, model_dir: str, spec: ModelSpec) -> None:
        from transformers import AutoModelForCausalLM

        self.spec = spec
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}

    def logprobs(
        self,
        sequences: list[list[int]],
        adapter: dict[str, torch.Tensor],
        norms: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        state = {k: v.clone() for k, v in self.base.items()}
        for layer in range(self.spec.num_layers):
            for module in ADAPTER.targets:
                a = adapter[lora_tensor_name(layer, module, "A")].float()
                b = adapter[lora_tensor_name(layer, module, "B")].float()
                path = lora_tensor_name(layer, module, "A").removeprefix("base_model.model.")
                state[path.removesuffix(".lora_A.weight") + ".weight"] += ADAPTER.scaling * (b @ a)
        for name, w in (norms or {}).items():
            state[name] = w.float()
        self.model.load_state_dict(state)
        rows = []
        with torch.no_grad():
            for seq in sequences:
                logp = torch.log_softmax(self.model(torch.tensor([seq])).logits[0].float(), -1)
                rows += [logp[t - 1, seq[t]].item() for t in range(1, len(seq))]
        return torch.tensor(rows, dtype=torch.float64)


def flat(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row], dtype=torch.float64)


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> ModelSpec:
    return load_spec(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, spec) -> Reference:
    return Reference(str(tiny_model_dir), spec)


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, spec, tmp_path_factory):
    """The engine started on a folder holding a *random* adapter: a stale re-read of it would show."""
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.lora.export import write_peft_adapter
    from qrl_megatron.rollout.engine import LoRAServing
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    folder = str(
        write_peft_adapter(
            random_adapter(spec, seed=99), tmp_path_factory.mktemp("adapter") / "a", ADAPTER, tiny_model_dir
        )
    )
    engine = VLLMEngine(
        str(tiny_model_dir), RolloutConfig(kv_cache_mib=64), seed=0, max_model_len=64,
        adapter=LoRAServing(ADAPTER, folder),
    )  # fmt: skip
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def sequences(lora_engine) -> list[list[int]]:
    return [lora_engine.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def base_gap(lora_engine, reference, spec, sequences) -> float:
    """The engine's gap to float32 transformers on the bare base (the zero adapter)."""
    zero = random_adapter(spec, seed=0, b_scale=0.0)
    lora_engine.update_adapter(zero, checksums(zero))
    return gap(flat(lora_engine.prompt_logprobs(sequences)), reference.logprobs(sequences, zero))


def push(engine, adapter: dict[str, torch.Tensor], sequences: list[list[int]]) -> torch.Tensor:
    engine.update_adapter(adapter, checksums(adapter))
    return flat(engine.prompt_logprobs(sequences))


def test_swapped_adapter_matches_merged_transformers_before_and_after_any_request(
    lora_engine, reference, spec, sequences
) -> None:
    # the first test of the module: the engine's very first request comes *after* an in-memory swap, and must
    # not read the start-up folder
    adapter = random_adapter(spec, seed=1)
    got = push(lora_engine, adapter, sequences)
    want = reference.logprobs(sequences, adapter)
    folder = reference.logprobs(sequences, random_adapter(spec, seed=99))
    zero = random_adapter(spec, seed=0, b_scale=0.0)
    bare = push(lora_engine, zero, sequences)
    base = gap(bare, reference.logprobs(sequences, zero))
    assert gap(got, want) <= 2 * base + FLOOR, (gap(got, want), base)
    assert gap(want, reference.logprobs(sequences, zero)) > 0.1  # the adapter matters
    assert gap(got, folder) > 0.1  # not the start-up folder's adapter
    # a second swap, after requests were served, replaces the first
    again = random_adapter(spec, seed=2)
    assert gap(push(lora_engine, again, sequences), reference.logprobs(sequences, again)) <= 2 * base + FLOOR


def test_same_tensors_twice_and_a_base_reload_do_not_scale_twice(
    lora_engine, reference, spec, sequences, base_gap, tiny_model_dir
) -> None:
    from qrl_megatron.models.base import load_hf_weights

    adapter = random_adapter(spec, seed=3)
    before = {k: v.clone() for k, v in adapter.items()}
    first = push(lora_engine, adapter, sequences)
    second = push(lora_engine, adapter, sequences)  # the same tensor objects again
    assert torch.equal(first, second)
    lora_engine.update_adapter(adapter, {})  # an empty manifest: the sender opted out of checksums
    assert torch.equal(flat(lora_engine.prompt_logprobs(sequences)), first)
    assert all(torch.equal(adapter[k], before[k]) for k in adapter)  # the caller's tensors are untouched
    assert gap(first, reference.logprobs(sequences, adapter)) <= 2 * base_gap + FLOOR
    # a base-weight update makes vLLM drop its adapters; the engine re-installs the in-memory one (once scaled)
    weights = {k: v.to(torch.bfloat16) for k, v in load_hf_weights(tiny_model_dir).items() if k != "lm_head.weight"}
    lora_engine.load_weights(weights)
    assert torch.equal(flat(lora_engine.prompt_logprobs(sequences)), first)


def test_refused_updates_keep_the_previous_adapter(lora_engine, spec, sequences) -> None:
    served = push(lora_engine, random_adapter(spec, seed=4), sequences)
    new = random_adapter(spec, seed=5)
    victim = lora_tensor_name(2, "down_proj", "B")

    corrupted = {k: v.clone() for k, v in new.items()}
    sums = checksums(corrupted)
    corrupted[victim][0, 0] += 1.0  # in transit, after the sender's checksums
    with pytest.raises(WeightVerificationError, match=victim.replace(".", r"\.")):
        lora_engine.update_adapter(corrupted, sums)
    assert torch.equal(flat(lora_engine.prompt_logprobs(sequences)), served)

    missing = {k: v for k, v in new.items() if k != victim}
    with pytest.raises(AdapterUpdateError, match=victim.replace(".", r"\.") + ": missing"):
        lora_engine.update_adapter(missing, checksums(missing))
    reshaped = dict(new)
    reshaped[victim] = torch.zeros(new[victim].shape[0], new[victim].shape[1] + 1, dtype=torch.bfloat16)
    with pytest.raises(AdapterUpdateError, match="shape"):
        lora_engine.update_adapter(reshaped, checksums(reshaped))
    unknown = dict(new)
    unknown["base_model.model.model.layers.0.mlp.fc9.lora_A.weight"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    with pytest.raises(AdapterUpdateError, match="fc9"):
        lora_engine.update_adapter(unknown, checksums(unknown))
    nan = {k: v.clone() for k, v in new.items()}
    nan[victim][0, 0] = float("nan")
    with pytest.raises(AdapterUpdateError, match="non-finite"):
        lora_engine.update_adapter(nan, checksums(nan))
    assert torch.equal(flat(lora_engine.prompt_logprobs(sequences)), served)


def test_trained_norms_change_logprobs_as_transformers_predicts(
    lora_engine, reference, spec, sequences, base_gap
) -> None:
    adapter = random_adapter(spec, seed=6)
    without = push(lora_engine, adapter, sequences)
    g = torch.Generator().manual_seed(7)
    clean = {name: reference.base[name].clone() for name in norm_shapes(spec)}
    trained = {n: (w * (1 + 0.2 * torch.randn(w.shape, generator=g))).to(torch.bfloat16) for n, w in clean.items()}
    lora_engine.update_norms(trained, checksums(trained))
    try:
        got = flat(lora_engine.prompt_logprobs(sequences))
        want = reference.logprobs(sequences, adapter, norms=trained)
        assert gap(got, want) <= 2 * base_gap + FLOOR, (gap(got, want), base_gap)
        assert gap(got, without) > 0.05
        bad = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(spec.hidden_size, dtype=torch.bfloat16)}
        with pytest.raises(AdapterUpdateError, match="q_proj"):
            lora_engine.update_norms(bad, checksums(bad))
    finally:
        restore = {n: w.to(torch.bfloat16) for n, w in clean.items()}
        lora_engine.update_norms(restore, checksums(restore))
    assert torch.equal(flat(lora_engine.prompt_logprobs(sequences)), without)


def test_vllm_lora_ranks_are_the_installed_vllms() -> None:
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    from qrl_megatron.rollout.lora_swap import VLLM_LORA_RANKS, smallest_lora_rank

    assert tuple(sorted(get_args(MaxLoRARanks))) == VLLM_LORA_RANKS
    assert [smallest_lora_rank(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]


@pytest.mark.skipif(
    os.environ.get("QRL_TEST_ALL_FORMATS") != "1",
    reason="a second engine start (`vllm serve`, ~50 s): runs with `make test-all` (QRL_TEST_ALL_FORMATS=1)",
)
def test_server_engine_swaps_the_adapter_like_the_colocated_one(
    lora_engine, tiny_model_dir, spec, sequences, tmp_path
) -> None:
    """``vllm serve`` with the adapter: the same swap over HTTP /collective_rpc, errors re-raised by name."""
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.lora.export import write_peft_adapter
    from qrl_megatron.rollout.engine import LoRAServing
    from qrl_megatron.rollout.server_engine import VLLMServerEngine

    folder = str(write_peft_adapter(random_adapter(spec, seed=99), tmp_path / "adapter", ADAPTER, tiny_model_dir))
    server = VLLMServerEngine(
        str(tiny_model_dir), RolloutConfig(kv_cache_mib=64), seed=0, max_model_len=64,
        adapter=LoRAServing(ADAPTER, folder),
    )  # fmt: skip
    try:
        # the start-up folder is what it serves first (vLLM loads it at start as adapter 1)
        start = random_adapter(spec, seed=99)
        assert gap(flat(server.prompt_logprobs(sequences)), push(lora_engine, start, sequences)) < 1e-3
        adapter = random_adapter(spec, seed=8)
        served = push(server, adapter, sequences)
        assert gap(served, push(lora_engine, adapter, sequences)) < 1e-3
        assert gap(served, flat(lora_engine.prompt_logprobs(sequences))) < 1e-3
        assert gap(served, push(lora_engine, start, sequences)) > 0.1
        corrupted = {k: v.clone() for k, v in adapter.items()}
        sums = checksums(corrupted)
        victim = lora_tensor_name(1, "q_proj", "A")
        corrupted[victim][0, 0] += 1.0
        with pytest.raises(WeightVerificationError, match=victim.replace(".", r"\.")):
            server.update_adapter(corrupted, sums)
        missing = {k: v for k, v in adapter.items() if k != victim}
        with pytest.raises(AdapterUpdateError, match="missing"):
            server.update_adapter(missing, checksums(missing))
        assert torch.equal(flat(server.prompt_logprobs(sequences)), served)
    finally:
        server.close()
