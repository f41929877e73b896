"""Data-parallel rollout (rollout/pool.py, bridge/fanout.py): the split and merge of a batch over N engines, one
weight stream fanned out to each, and an engine that dies (rollout.on_engine_failure)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import psutil
import pytest
import torch

from qrl_megatron.bridge.checksum import WeightVerificationError, checksums
from qrl_megatron.bridge.fanout import FanOutTransport
from qrl_megatron.bridge.transport import SharedMemoryTransport, read_bucket
from qrl_megatron.rollout.engine import Completion, EngineDied
from qrl_megatron.rollout.pool import EnginePool, contiguous_shards, merge_shards

# -- split and merge ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("count", "parts", "expected"),
    [
        (8, 2, [(0, 4), (4, 8)]),
        (5, 2, [(0, 3), (3, 5)]),  # uneven: the first shards are the larger
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (1, 2, [(0, 1), (1, 1)]),  # more engines than prompts: the last ones get none
        (0, 3, [(0, 0), (0, 0), (0, 0)]),
    ],
)
def test_contiguous_shards_cover_the_batch_in_order(count, parts, expected):
    assert contiguous_shards(count, parts) == expected


@pytest.mark.unit
def test_merge_puts_shards_back_in_prompt_order_whatever_order_they_finish():
    def shard(first: int, prompts: int, n: int) -> tuple[int, list[Completion]]:
        return first, [
            Completion(p, [first + p], [first + p, s], [0.0, 0.0], f"{first + p}/{s}", True)
            for p in range(prompts)
            for s in range(n)
        ]

    shards = [shard(3, 2, 2), shard(0, 3, 2), shard(5, 0, 2)]  # finished out of order; an empty shard
    merged = merge_shards(shards)
    assert [c.prompt_index for c in merged] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [c.text for c in merged] == [f"{p}/{s}" for p in range(5) for s in range(2)]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        (["rollout.engines=0"], ["rollout.engines"]),
        (["rollout.on_engine_failure=retry"], ["rollout.on_engine_failure", "continue"]),
        (
            ["rollout.engine=server", "rollout.engines=2", "rollout.server_url=http://127.0.0.1:8000"],
            ["rollout.engines=2", "rollout.server_url"],
        ),
        (["rollout.engines=2", "sync.tcp_port=29555"], ["sync.tcp_port=29555", "sync.tcp_port=0"]),
    ],
)
def test_bad_data_parallel_settings_are_one_error_naming_the_key(overrides, parts):
    from e2e_utils import REPO

    from qrl_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides)
    assert all(p in str(info.value) for p in parts) and "\n" not in str(info.value), str(info.value)


@pytest.mark.unit
def test_colocated_engines_on_a_gpu_are_refused_with_the_fix():
    from qrl_megatron.config_fields import ConfigError
    from qrl_megatron.rollout.config import RolloutConfig

    with pytest.raises(ConfigError, match=r"rollout.engines=2 colocated .* rollout.engine=server"):
        RolloutConfig(engines=2).check_device(cuda=True)
    RolloutConfig(engines=2).check_device(cuda=False)  # CPU: every engine in host memory
    RolloutConfig(engine="server", engines=2).check_device(cuda=True)


# -- the fan-out transport ----------------------------------------------------------------------------------------


class ReadingChannel:
    """The engine side of the shm handover, in-process: every announced bucket is read from its file and checked by
    the engine's own reader (read_bucket: checksums first); the bytes it received are counted."""

    def __init__(self, corrupt: bool = False, dead: bool = False) -> None:
        self.corrupt, self.dead = corrupt, dead
        self.received_bytes, self.paths, self.calls = 0, [], []

    def call(self, name: str, info: Mapping[str, Any] | None = None) -> Any:
        self.calls.append(name)
        if self.dead:
            raise EngineDied("engine process gone")
        if name == "update_weights":
            assert info is not None
            sums = {k: ("crc32:0" if self.corrupt else v) for k, v in info["checksums"].items()}
            tensors = read_bucket(info["path"], sums)
            self.paths.append(info["path"])
            self.received_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return None

    def rpc(self, method: str, *args: Any) -> list[Any]:
        return [method]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


BUCKETS = [
    {"a.weight": torch.randn(64, 32, dtype=torch.bfloat16), "a.bias": torch.randn(64, dtype=torch.bfloat16)},
    {"b.weight": torch.randint(0, 255, (128, 16), dtype=torch.uint8), "b.scale": torch.rand(128, 1)},
]


def _stream(transport: Any) -> None:
    transport.start()
    for bucket in BUCKETS:
        transport.update(bucket, checksums(bucket))
    transport.finish()


@pytest.mark.unit
def test_fan_out_delivers_the_single_engine_bytes_to_every_engine_from_one_write():
    single = ReadingChannel()
    _stream(SharedMemoryTransport(single))
    channels = [ReadingChannel() for _ in range(3)]
    fan = FanOutTransport([SharedMemoryTransport(c) for c in channels], on_death=lambda i, e: pytest.fail(str(e)))
    _stream(fan)
    expected = sum(t.numel() * t.element_size() for b in BUCKETS for t in b.values())
    assert single.received_bytes == expected
    assert [c.received_bytes for c in channels] == [expected] * 3  # counted where the engines read them
    assert fan.sent_bytes == [expected] * 3
    for k in range(len(BUCKETS)):  # each bucket written once: every engine read the same file
        assert len({c.paths[k] for c in channels}) == 1
    assert all(c.calls == single.calls for c in channels)  # start, updates, finish, prefix reset: same calls
    fan.close()


@pytest.mark.unit
def test_fan_out_reports_a_dead_engine_after_the_others_and_raises_a_corrupted_one():
    healthy, dead = ReadingChannel(), ReadingChannel(dead=True)
    deaths: list[int] = []
    fan = FanOutTransport([SharedMemoryTransport(healthy), SharedMemoryTransport(dead)], on_death=None)  # type: ignore[arg-type]

    def drop(i: int, err: EngineDied) -> None:
        deaths.append(i)
        fan.drop(i)

    fan.on_death = drop
    _stream(fan)
    assert deaths == [1] and fan.active == [0]  # dropped at start(); never called again
    assert dead.calls == ["start_weight_update"] and healthy.received_bytes == fan.sent_bytes[0] > 0
    corrupted = FanOutTransport(
        [SharedMemoryTransport(ReadingChannel()), SharedMemoryTransport(ReadingChannel(corrupt=True))],
        on_death=lambda i, e: pytest.fail(str(e)),
    )
    with pytest.raises(WeightVerificationError, match="a.weight"):
        _stream(corrupted)
    fan.close()
    corrupted.close()


# -- two real colocated engines -----------------------------------------------------------------------------------

PROMPTS = ["12+34=", "7+8=", "99+1=", "5+5=", "40+2="]  # 5 prompts over 2 engines: shards of 3 and 2
ANSWERS = ["46", "15", "100", "10", "42"]
NAMES = ["rollout engine 0 of 2 (colocated)", "rollout engine 1 of 2 (colocated)"]


def _key(c: Completion) -> tuple:
    return (c.prompt_index, tuple(c.prompt_token_ids), tuple(c.token_ids), c.finished, c.text)


def _newest_engine_core() -> psutil.Process:
    cores = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                cores.append(child)
    assert cores, "no vLLM engine-core process under this test"
    return max(cores, key=lambda p: p.create_time())


@pytest.mark.e2e
def test_two_colocated_engines_sample_the_one_engine_batch_and_outlive_a_killed_engine(
    tiny_engine, tiny_model_dir, capsys
):
    """Engine 0 alone (rollout.engines=1) vs a pool of it and a second engine: the same completions, prompt by prompt
    (seeds by global prompt index), the same rewards, the single-engine bytes streamed to each engine; then engine 1's
    core is SIGKILLed: `stop` raises naming it, `continue` re-splits its prompts (still the same batch) and syncs on."""
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.rollout.config import RolloutConfig
    from qrl_megatron.rollout.stage import score
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    second = VLLMEngine(str(tiny_model_dir), RolloutConfig(kv_cache_mib=64), seed=0, max_model_len=64)  # = conftest's
    core = _newest_engine_core()
    try:
        weights = {k: v.to(torch.bfloat16) for k, v in load_hf_weights(tiny_model_dir).items() if k != "lm_head.weight"}
        pool = EnginePool([tiny_engine, second], NAMES, on_failure="stop")
        pool.begin_step(1)
        pool.load_weights(weights)  # one bucket through the fan-out, verified by each engine
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        assert pool.transport.sent_bytes == [nbytes, nbytes]
        per_engine = pool.checksums_per_engine()
        assert per_engine[0] == per_engine[1]

        single = tiny_engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, step=1)
        split = pool.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, step=1)
        assert [_key(c) for c in split] == [_key(c) for c in single]
        gap = max(abs(a - b) for s, p in zip(single, split) for a, b in zip(s.rollout_logprobs, p.rollout_logprobs))
        assert gap < 1e-3, gap
        assert torch.equal(score(split, ANSWERS), score(single, ANSWERS))
        metrics = pool.step_metrics()
        assert metrics["engine0/rollout_tokens_per_s"] > 0 and metrics["engine1/rollout_tokens_per_s"] > 0
        assert metrics["engine0/sync_bytes"] == metrics["engine1/sync_bytes"] == nbytes
        one = pool.generate(PROMPTS[:1], n=4, temperature=1.0, max_new_tokens=8, step=1)  # N > prompts
        assert [_key(c) for c in one] == [_key(c) for c in single[:4]]
        greedy = pool.greedy(PROMPTS, 8)
        assert [c.token_ids for c in greedy] == [c.token_ids for c in tiny_engine.greedy(PROMPTS, 8)]

        core.kill()  # engine 1's engine-core process
        core.wait(timeout=30)
        pool.begin_step(2)
        with pytest.raises(
            EngineDied, match=r"rollout engine 1 of 2 \(colocated\) died at step 2: .*on_engine_failure=stop"
        ):
            pool.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, step=1)

        survivor = EnginePool([tiny_engine, second], NAMES, on_failure="continue")
        survivor.begin_step(2)
        again = survivor.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, step=1)
        assert [_key(c) for c in again] == [_key(c) for c in single]  # its prompts re-split: the same batch
        assert "rollout engine 1 of 2 (colocated) died at step 2" in capsys.readouterr().out
        assert survivor.alive == [0] and survivor.step_metrics()["engines_alive"] == 1.0

        syncing = EnginePool([tiny_engine, second], NAMES, on_failure="continue")  # the death found in a sync
        syncing.begin_step(3)
        syncing.load_weights(weights)
        assert syncing.alive == [0] and syncing.transport.sent_bytes == [nbytes, 0]
        assert "continuing on 1 of 2 engines" in capsys.readouterr().out
    finally:
        with contextlib.suppress(Exception):
            second.close()


# -- qrl-train: two `vllm serve` servers on loopback, refitted over TCP every step ------------------------------------

# the rollout of a step: these are functions of its tokens alone, so equal batches give equal values
TOKEN_METRICS = ("reward_mean", "accuracy", "groups_all_equal", "response_length_mean", "truncated_fraction")


def _servers_under(pid: int) -> list[psutil.Process]:
    """The `vllm serve` API-server processes the trainer started (each leads its own process group)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if "--port" in cmd and "--weight-transfer-config" in cmd and child.pid == os.getpgid(child.pid):
                found.append(child)
    return found


@pytest.mark.e2e
def test_two_servers_refitted_over_tcp_train_and_a_killed_server_is_named_and_dropped(
    tmp_path, reference_run, run_cache_dir
):
    """rollout.engine=server rollout.engines=2 sync.transport=tcp: step 1 samples the batch of the one-engine
    reference run (same token-level metrics) and every step streams the single-engine bytes to each server; one
    server's process group is SIGKILLed after step 1, and with rollout.on_engine_failure=continue it is named by
    host:port and step, its prompts go to the other server, and the run ends normally."""
    import signal
    import subprocess
    import time

    from e2e_utils import REFERENCE, REPO, qrl_train_command, read_metrics

    run = tmp_path / "run"
    command = qrl_train_command(
        run, run_cache_dir, *REFERENCE, "trainer.max_steps=3", "trainer.save_every=0", "trainer.checkpoint=false",
        "rollout.engine=server", "rollout.engines=2", "sync.transport=tcp", "rollout.on_engine_failure=continue",
    )  # fmt: skip
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 500
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "timed out waiting for step 1"
            time.sleep(0.2)
        servers = _servers_under(proc.pid)
        assert len(servers) == 2, [s.cmdline() for s in servers]
        victim = servers[0]
        port = victim.cmdline()[victim.cmdline().index("--port") + 1]
        os.killpg(victim.pid, signal.SIGKILL)  # the server, its engine core and workers
        assert proc.wait(timeout=400) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:  # a failed test: the trainer and the servers it started (their own sessions)
            for server in _servers_under(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert f"rollout server 127.0.0.1:{port} (engine " in out and " of 2) died at step " in out, out[-4000:]
    assert "continuing on 1 of 2 engines" in out

    rows, reference = read_metrics(run), read_metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert {k: first[k] for k in TOKEN_METRICS} == {k: reference[0][k] for k in TOKEN_METRICS}
    assert first["sync_bytes"] == reference[0]["sync_bytes"] > 0  # one stream from the learner
    assert first["engine0/sync_bytes"] == first["engine1/sync_bytes"] == first["sync_bytes"]  # ...to each server
    assert first["engines_alive"] == 2 and rows[-1]["engines_alive"] == 1
    assert first["engine0/rollout_tokens_per_s"] > 0 and first["engine1/rollout_tokens_per_s"] > 0
    alive = 0 if rows[-1]["engine0/sync_bytes"] else 1  # the survivor still gets every step's whole stream
    assert (
        rows[-1][f"engine{alive}/sync_bytes"] == rows[-1]["sync_bytes"]
        and rows[-1][f"engine{1 - alive}/sync_bytes"] == 0
    )
