"""The engine's memory from config (rollout.gpu_memory_utilization / kv_cache_mib / enforce_eager / sleep_level) and
the learner's optimizer offload (learner.offload_optimizer).

vLLM's sleep mode exists only on CUDA (vLLM 0.32 raises "Sleep mode is not supported on current platform" on
CPU), so the engines' sleep / wake calls are checked against a recording stand-in for the CUDA-only ``LLM`` methods
and HTTP routes; what runs on CPU for real is the refusal at start. The offload's move logic runs on CPU where it
can (which tensors move: Adam moments and master copies, never the model's own parameters); the round trip through
host memory needs a second device and is the gpu test. Checked against the real Megatron optimizer on the tiny
model (ChainedOptimizer, plain and distributed): bf16 learner 12 bytes/parameter found (fp32 master + both
moments), fp32 learner 8 (the moments; the optimizer steps the model's own parameters, which stay).
"""

from __future__ import annotations

import pytest
import torch

from qrl_megatron.config import ConfigError, LearnerConfig, QRLConfig, RolloutConfig
from qrl_megatron.learner.offload import offload_optimizer, optimizer_slots
from qrl_megatron.train import check_device_settings


@pytest.mark.unit
def test_engine_memory_arguments_come_from_the_config() -> None:
    assert RolloutConfig().engine_memory_args() == {
        "kv_cache_memory_bytes": 256 * 2**20,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": True,
        "enable_sleep_mode": False,
    }
    gpu = RolloutConfig(kv_cache_mib=0, gpu_memory_utilization=0.35, enforce_eager=False, sleep_level=1)
    assert gpu.engine_memory_args() == {
        "kv_cache_memory_bytes": None,  # vLLM sizes it from the fraction
        "gpu_memory_utilization": 0.35,
        "enforce_eager": False,
        "enable_sleep_mode": True,
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"gpu_memory_utilization": 0.0}, "rollout.gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "rollout.gpu_memory_utilization"),
        ({"kv_cache_mib": -1}, "rollout.kv_cache_mib"),
        ({"sleep_level": 3}, "rollout.sleep_level"),
        ({"sleep_level": 1, "server_url": "http://h:8000"}, "rollout.sleep_level"),
    ],
)
def test_engine_memory_settings_are_validated(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RolloutConfig(**settings).validate()


@pytest.mark.unit
def test_gpu_only_settings_are_refused_at_start_without_cuda() -> None:
    def refused(cfg: QRLConfig) -> str:
        with pytest.raises(ConfigError) as err:
            check_device_settings(cfg, cuda=False)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "rollout.sleep_level=0" in refused(QRLConfig(rollout=RolloutConfig(sleep_level=1)))
    assert "rollout.kv_cache_mib to a size" in refused(QRLConfig(rollout=RolloutConfig(kv_cache_mib=0)))
    assert "learner.offload_optimizer=false" in refused(QRLConfig(learner=LearnerConfig(offload_optimizer=True)))
    check_device_settings(QRLConfig(), cuda=False)  # the defaults run on CPU
    on_gpu = QRLConfig(
        rollout=RolloutConfig(sleep_level=2, kv_cache_mib=0), learner=LearnerConfig(offload_optimizer=True)
    )
    check_device_settings(on_gpu, cuda=True)
    qerl = QRLConfig(rollout=RolloutConfig(sleep_level=2))
    qerl.learner.lora.rank = 8
    with pytest.raises(ConfigError, match="rollout.sleep_level=1"):  # the base is never streamed again
        check_device_settings(qerl, cuda=True)


class _RecordingLLM:
    """The CUDA-only sleep-mode methods of vLLM's ``LLM``, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        return True


@pytest.mark.unit
@pytest.mark.parametrize("level", [0, 1, 2])
def test_colocated_engine_sleeps_after_rollout_and_wakes_weights_then_kv_cache(
    level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    from qrl_megatron.rollout import vllm_engine
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    monkeypatch.setattr(vllm_engine, "_engine_alive", contextlib.nullcontext)  # its vLLM import: 10 s of CPU

    engine = object.__new__(VLLMEngine)  # no vLLM start: the calls under test are CUDA-only
    engine.cfg, engine.llm, engine.sleeping = RolloutConfig(sleep_level=level), _RecordingLLM(), set()
    engine.reacquire_memory(["weights"])  # awake: nothing to do
    engine.release_memory()
    engine.release_memory()  # once
    engine.reacquire_memory(["weights"])  # before the weight sync
    engine.reacquire_memory()  # before generating: what is still released
    engine.reacquire_memory()
    expected = [("sleep", level), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])] if level else []
    assert engine.llm.calls == expected


@pytest.mark.unit
def test_server_engine_sleep_routes_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from qrl_megatron.rollout import server_engine
    from qrl_megatron.rollout.server_engine import VLLMServerEngine

    engine = object.__new__(VLLMServerEngine)
    engine.cfg, engine.sleeping = RolloutConfig(sleep_level=1, kv_cache_mib=0, gpu_memory_utilization=0.4), set()
    posts: list[str] = []
    engine._post = lambda path, body=None: posts.append(path)  # type: ignore[method-assign]
    engine.release_memory()
    engine.reacquire_memory(["weights"])
    engine.reacquire_memory()
    assert posts == ["/sleep?level=1", "/wake_up?tags=weights", "/wake_up?tags=kv_cache"]

    started: list[list[str]] = []

    def popen(command: list[str], **kwargs: object) -> object:
        started.append(command)
        raise OSError("not started in this test")

    monkeypatch.setattr(server_engine.subprocess, "Popen", popen)
    engine.model_dir, engine.seed, engine.adapter = "/nonexistent", 0, None
    engine.weight_backend = "qrl_shm"  # what __init__ sets from sync.transport
    with pytest.raises(OSError):
        engine._start_server(64, {}, ())
    command = started[0]
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.4"
    assert "--kv-cache-memory-bytes" not in command and "--enable-sleep-mode" in command


class _Wrapper:
    """Megatron's optimizer shape: ChainedOptimizer -> MegatronOptimizer -> ``.optimizer`` (a torch optimizer)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


class _Chained:
    def __init__(self, *optimizers: _Wrapper) -> None:
        self.chained_optimizers = list(optimizers)


class _Learner:
    """A bf16 model whose Adam steps fp32 master copies (Megatron's Float16OptimizerWithFloat16Params) plus an fp32
    layer stepped in place (FP32Optimizer)."""

    def __init__(self, device: str) -> None:
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(device)
        self.model[0].to(torch.bfloat16)
        masters = [p.detach().float().clone() for p in self.model[0].parameters()]
        in_place = list(self.model[1].parameters())
        self.optimizer = _Chained(_Wrapper(torch.optim.Adam(masters)), _Wrapper(torch.optim.Adam(in_place)))
        for p in masters + in_place:
            p.grad = torch.randn_like(p)
        for w in self.optimizer.chained_optimizers:
            w.optimizer.step()
        self.masters = masters


def _state(learner: _Learner) -> list[torch.Tensor]:
    return [s.get() for s in optimizer_slots(learner)]


@pytest.mark.unit
def test_offload_moves_optimizer_state_and_masters_not_the_model() -> None:
    learner = _Learner("cpu")
    slots = optimizer_slots(learner)
    owners = {id(s.owner) for s in slots if s.key is None}
    assert owners == {id(p) for p in learner.masters}  # the masters; the model's own parameters are not slots
    assert sorted({s.key for s in slots if s.key is not None}) == ["exp_avg", "exp_avg_sq", "step"]
    before = [t.clone() for t in _state(learner)]
    record = offload_optimizer(learner, "cpu")  # on the host already: nothing moves
    assert record.nbytes == 0 and not record.moved
    record.restore()
    assert all(torch.equal(a, b) for a, b in zip(_state(learner), before, strict=True))
    assert optimizer_slots(type("Frozen", (), {"optimizer": None, "model": learner.model})()) == []


@pytest.mark.gpu
def test_offload_round_trip_through_pinned_host_memory_is_bit_exact() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    learner = _Learner("cuda")
    before = [t.clone() for t in _state(learner)]
    devices = [t.device for t in before]
    model = [p.detach().clone() for p in learner.model.parameters()]
    free = torch.cuda.memory_allocated()
    record = offload_optimizer(learner)
    assert record.nbytes > 0 and torch.cuda.memory_allocated() < free
    moved = [t for t in _state(learner) if t.device.type == "cpu" and t.numel() > 1]
    assert moved and all(t.is_pinned() for t in moved)
    assert all(p.is_cuda for p in learner.model.parameters())  # the model stays
    record.restore()
    after = _state(learner)
    assert [t.device for t in after] == devices
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(learner.model.parameters(), model, strict=True))
    for w in learner.optimizer.chained_optimizers:  # Adam still steps (its state is where it expects it)
        w.optimizer.step()
