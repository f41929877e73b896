"""QeRL's adapter and norm updates over ``sync.transport=tcp``: the trainer's TcpTransport and a worker's
``qrl_load_adapter`` / ``qrl_set_norms`` in this process, over a real loopback socket (the channel stands in for
HTTP ``/collective_rpc``; the arguments go through JSON as they would).

The worker is the project's worker extension over the ``qrl_tcp`` engine the trainer's stream connects to; the
norms are vLLM's own RMSNorm modules. Only vLLM's LoRA manager is not here (it needs a running engine: the swap
itself is tested on a real one in tests/test_lora_engine.py and, over TCP, tests/test_tcp_rollout_server.py):
the test puts a recorder of what is served in its place. Corruption is injected from the test: a byte of a tensor
changed after its checksum was taken, or flipped in transit by a proxy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from test_tcp_transport import _Channel, _engine, _flipping_proxy, tcp_free_port

from qrl_megatron.bridge import tcp
from qrl_megatron.bridge.checksum import WeightVerificationError, checksums
from qrl_megatron.bridge.fanout import FanOutTransport
from qrl_megatron.bridge.transport import TcpOptions, TcpTransport, make_transport
from qrl_megatron.lora.adapter import AdapterSpec
from qrl_megatron.rollout import lora_swap
from qrl_megatron.rollout.lora_swap import AdapterUpdateError, adapter_info
from qrl_megatron.rollout.worker_extension import QRLWorkerExtension

pytestmark = pytest.mark.unit

ADAPTER = AdapterSpec(rank=4, alpha=8.0)
NAMES = [
    f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "mlp.down_proj")
    for ab in "AB"
]


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((4, 8) if ".lora_A." in n else (8, 4), generator=g).to(torch.bfloat16) for n in NAMES}


class _Model(torch.nn.Module):
    """Two decoder layers' RMSNorms (vLLM's own modules), named as the served model names them."""

    def __init__(self) -> None:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.layernorm import RMSNorm

        super().__init__()
        with set_current_vllm_config(VllmConfig()):
            layers = [torch.nn.Module() for _ in range(2)]
            for layer in layers:
                layer.input_layernorm = RMSNorm(8)
                layer.post_attention_layernorm = RMSNorm(8)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(layers)
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights: Any) -> set[str]:
        for name, t in weights:
            self.loaded[name] = t.clone()
        return set()


class _Runner:
    def __init__(self, model: _Model) -> None:
        self.model = model

    def get_model(self) -> _Model:
        return self.model


class _Worker(QRLWorkerExtension):
    """A vLLM worker as far as the worker extension sees one: its weight-transfer engine (the ``qrl_tcp`` one the
    trainer streams to) and its model runner."""

    def __init__(self, engine: Any) -> None:
        self.weight_transfer_engine = engine
        self.model_runner = _Runner(engine.model)


class _RpcChannel(_Channel):
    """``/collective_rpc`` of a one-worker server: the arguments through JSON, the worker's method called."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__(worker.weight_transfer_engine)
        self.worker = worker
        self.prefix_resets = 0

    def rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*json.loads(json.dumps(list(args))))]

    def reset_prefix_cache(self) -> None:
        self.prefix_resets += 1


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """What the worker serves, in place of vLLM's LoRA manager: the swap is validated as the real one is (the
    expected PEFT names and shapes, floating, finite) and then recorded."""
    pytest.importorskip("vllm")
    current: dict[str, torch.Tensor] = {}

    def install(worker: Any, tensors: Mapping[str, torch.Tensor], state: Any) -> dict[str, Any]:
        lora_swap.validate_adapter_tensors(tensors, {n: (4, 8) if ".lora_A." in n else (8, 4) for n in NAMES})
        current.clear()
        current.update({k: v.clone() for k, v in tensors.items()})
        return {"lora_id": state.lora_id, "tensors": len(tensors)}

    monkeypatch.setattr(lora_swap, "_install", install)
    return current


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapter_streams_to_the_worker_and_a_corrupted_one_is_refused_by_name_keeping_the_previous(
    served: dict[str, torch.Tensor],
) -> None:
    engine = _engine()
    engine.model = _Model()
    worker = _Worker(engine)
    channel = _RpcChannel(worker)
    transport = make_transport("tcp", channel, tcp=TcpOptions(timeout_s=5.0))
    assert isinstance(transport, TcpTransport)
    transport.init()
    info = adapter_info(ADAPTER, 1)

    first = _adapter(1)
    reports = transport.update_adapter(first, checksums(first), info)
    assert reports == [{"lora_id": 1, "tensors": len(NAMES)}]
    assert _same(served, first) and _same(worker._qrl_adapter_state.tensors, first)
    assert transport.sent_bytes == tcp.payload_size(first) and channel.prefix_resets == 1

    victim = NAMES[5]
    second = _adapter(2)
    damaged = dict(second)
    damaged[victim] = second[victim].clone()
    damaged[victim].view(torch.uint8).view(-1)[7] ^= 0x10  # altered after the checksum was taken
    with pytest.raises(WeightVerificationError, match=re.escape(victim) + ": checksum"):
        transport.update_adapter(damaged, checksums(second), info)
    assert _same(served, first) and _same(worker._qrl_adapter_state.tensors, first)  # the previous one is served

    wrong = {**second, NAMES[0]: torch.zeros(4, 9, dtype=torch.bfloat16)}  # checksums fine, the adapter is not
    with pytest.raises(AdapterUpdateError, match=re.escape(NAMES[0]) + r": shape \[4, 9\]"):
        transport.update_adapter(wrong, checksums(wrong), info)
    assert _same(served, first)

    transport.update_adapter(second, checksums(second), info)  # the stream is still in step
    assert _same(served, second) and _same(worker._qrl_adapter_state.tensors, second)

    # trained norms on the same stream, copied into vLLM's RMSNorm modules; a weight bucket still follows in step
    norms = {f"model.layers.{i}.input_layernorm.weight": torch.full((8,), 1.5 + i) for i in range(2)}
    assert transport.update_norms(norms, checksums(norms)) == [{"norms": 2}]
    assert torch.equal(engine.model.model.layers[1].input_layernorm.weight.data, torch.full((8,), 2.5))
    bad = {"model.layers.0.mlp.down_proj.weight": torch.ones(8)}
    with pytest.raises(AdapterUpdateError, match=r"down_proj\.weight: not a decoder-layer RMSNorm"):
        transport.update_norms(bad, checksums(bad))
    weights = {"model.norm.weight": torch.randn(8)}
    transport.start()
    transport.update(weights, checksums(weights))
    transport.finish()
    assert _same(engine.model.loaded, weights)
    transport.close()


def test_an_adapter_flipped_in_transit_is_refused_and_a_broken_stream_reconnects_at_the_next_update(
    served: dict[str, torch.Tensor],
) -> None:
    engine = _engine()
    worker = _Worker(engine)
    transport = TcpTransport(_RpcChannel(worker), 1, TcpOptions("127.0.0.1", tcp_free_port(), 5.0))
    first, info = _adapter(3), adapter_info(ADAPTER, 1)
    victim = NAMES[2]
    flip = 24 + sum(first[n].numel() * first[n].element_size() for n in NAMES[: NAMES.index(victim)]) + 3
    with _flipping_proxy(transport.options.port, flip_at=flip) as proxy_port:
        channel = _RpcChannel(worker)
        channel.redirect = proxy_port
        transport.channel = channel
        transport.init()
        with pytest.raises(WeightVerificationError, match=re.escape(victim) + ": checksum"):
            transport.update_adapter(first, checksums(first), info)
        assert served == {}
        transport.update_adapter(first, checksums(first), info)  # past the flipped byte: in step, accepted
        assert _same(served, first)
        engine.stream.close()  # the worker's end goes away (a server restarted its workers)
        engine.stream = None
        with pytest.raises(tcp.TcpStreamError):
            transport.update_adapter(_adapter(4), checksums(_adapter(4)), info)
        assert transport.streams == [] and _same(served, first)
        transport.channel = _RpcChannel(worker)  # the next update opens a new stream (here: past the proxy)
        transport.update_adapter(_adapter(4), checksums(_adapter(4)), info)
        assert _same(served, _adapter(4))
    transport.close()


def test_fanout_over_tcp_members_gives_every_engine_the_adapter(served: dict[str, torch.Tensor]) -> None:
    workers = [_Worker(_engine()) for _ in range(2)]
    members = [make_transport("tcp", _RpcChannel(w), tcp=TcpOptions(timeout_s=5.0)) for w in workers]

    def died(i: int, err: Exception) -> None:
        raise err

    fanout = FanOutTransport(members, died)
    fanout.init()
    adapter = _adapter(5)
    fanout.update_adapter(adapter, checksums(adapter), adapter_info(ADAPTER, 1))
    for worker, member in zip(workers, members, strict=True):
        assert _same(worker._qrl_adapter_state.tensors, adapter)
        assert member.sent_bytes == tcp.payload_size(adapter)
    fanout.close()
    for member in members:
        member.close()
