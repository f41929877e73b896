"""qrl_megatron.platform: the CPU shim's manifest and version guard, the layout check, the free-port helper."""

from __future__ import annotations

import importlib
import importlib.metadata
import socket
import threading
from dataclasses import dataclass

import pytest
import torch

from qrl_megatron.platform import MANIFEST, check_megatron_version, cuda_tensor_compat, validate_layout
from qrl_megatron.platform.cpu_shim import ALLOW_VERSION_ENV, SUPPORTED_MEGATRON_VERSION
from qrl_megatron.utils.net import free_port


@pytest.mark.unit
def test_manifest_names_importable_modules_and_existing_callables():
    assert MANIFEST, "the shim patches something"
    for key, reason in MANIFEST.items():
        assert isinstance(reason, str) and reason.strip(), f"{key}: no reason given"
        mod_name, _, qualname = key.partition(":")
        assert mod_name.startswith("megatron.core"), key
        mod = importlib.import_module(mod_name)
        obj = mod
        for part in filter(None, qualname.split(".")):
            assert hasattr(obj, part), f"{key}: {part} not found"
            obj = getattr(obj, part)
        if qualname:
            assert callable(obj), key


@pytest.mark.unit
def test_version_guard_accepts_the_supported_version(monkeypatch):
    monkeypatch.delenv(ALLOW_VERSION_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: SUPPORTED_MEGATRON_VERSION)
    assert check_megatron_version() == SUPPORTED_MEGATRON_VERSION


@pytest.mark.unit
def test_version_guard_rejects_other_versions_unless_allowed(monkeypatch, caplog):
    monkeypatch.delenv(ALLOW_VERSION_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1")
    with pytest.raises(RuntimeError) as err:
        check_megatron_version()
    message = str(err.value)
    assert "0.0.1" in message and SUPPORTED_MEGATRON_VERSION in message and f"{ALLOW_VERSION_ENV}=1" in message

    monkeypatch.setenv(ALLOW_VERSION_ENV, "1")
    with caplog.at_level("WARNING", logger="qrl_megatron.platform.cpu_shim"):
        assert check_megatron_version() == "0.0.1"
    assert any("0.0.1" in r.getMessage() for r in caplog.records)


@pytest.mark.unit
def test_cuda_tensor_compat_is_confined_to_its_thread():
    seen: dict[str, str] = {}

    def other_thread() -> None:
        seen["type"] = torch.zeros(1).type()

    with cuda_tensor_compat():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen["type"] == "torch.FloatTensor"
    assert "type" not in torch.Tensor.__dict__ and "cuda" not in torch.Tensor.__dict__


@dataclass(frozen=True)
class _Shape:
    num_layers: int = 4
    num_attention_heads: int = 8
    num_query_groups: int = 2
    vocab_size: int = 64
    ffn_hidden_size: int = 32


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tp", "pp", "dp", "world", "expected_dp"),
    [(1, 1, None, 1, 1), (2, 2, None, 8, 2), (2, 2, 1, 4, 1), (1, 4, 2, 8, 2), (2, 1, 3, 6, 3)],
)
def test_validate_layout_accepts_good_layouts(tp, pp, dp, world, expected_dp):
    assert validate_layout(tp, pp, dp, world, model=_Shape()) == expected_dp


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "kwargs", "key"),
    [
        ((0, 1, 1, 1), {}, "learner.tp"),
        ((1, True, 1, 1), {}, "learner.pp"),
        ((1, 1, 0, 1), {}, "learner.dp"),
        ((2, 2, 1, 2), {}, r"learner\.tp \* learner\.pp \* learner\.dp"),
        ((1, 3, None, 4), {}, r"learner\.tp \* learner\.pp"),
        ((4, 1, 1, 4), {"model": _Shape()}, r"learner\.tp = 4 .*num_query_groups"),
        ((2, 1, 1, 2), {"model": _Shape(vocab_size=63)}, r"learner\.tp = 2 .*vocab_size = 63"),
        ((2, 1, 1, 2), {"model": _Shape(ffn_hidden_size=33)}, r"learner\.tp = 2 .*ffn_hidden_size"),
        ((1, 3, 1, 3), {"model": _Shape()}, r"learner\.pp = 3 .*num_layers = 4"),
        ((1, 3, 1, 3), {"num_layers": 4}, r"learner\.pp = 3 .*num_layers = 4"),
    ],
)
def test_validate_layout_rejects_bad_layouts_naming_the_key(args, kwargs, key):
    with pytest.raises(ValueError, match=key):
        validate_layout(*args, **kwargs)


@pytest.mark.unit
def test_validate_layout_explicit_dimension_overrides_model():
    assert validate_layout(2, 1, 1, 2, vocab_size=64, model=_Shape(vocab_size=63)) == 1


@pytest.mark.unit
def test_free_port_is_bindable():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
