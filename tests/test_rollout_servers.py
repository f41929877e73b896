"""Servers from a list: rollout.server_url / server_urls / server_list, the health wait (real HTTP servers on
loopback that answer /health late or never) and its one-line failures."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qrl_megatron.config import RolloutConfig
from qrl_megatron.config_fields import ConfigError
from qrl_megatron.rollout import servers
from qrl_megatron.rollout.servers import ServersNotReady, connect_servers, read_server_list, run_transport

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "POLL_S", 0.1)


@contextmanager
def _health_server(ready_after_s: float = 0.0) -> Iterator[str]:
    """A loopback HTTP server whose GET /health answers 503 until ``ready_after_s`` has passed, then 200."""
    start = time.monotonic()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            ok = self.path == "/health" and time.monotonic() - start >= ready_after_s
            self.send_response(200 if ok else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_url() -> str:
    from qrl_megatron.utils.net import free_port

    return f"http://127.0.0.1:{free_port()}"


def test_one_url_is_todays_server_url() -> None:
    with _health_server() as url:
        for cfg in (
            RolloutConfig(engine="server", server_url=url + "/"),
            RolloutConfig(engine="server", server_urls=[url]),
        ):
            cfg.validate()
            got = connect_servers(cfg, progress=lambda line: None)
            assert (got.server_url, got.server_urls, got.server_list) == (url, [], "")
    assert connect_servers(RolloutConfig(engine="server")) == RolloutConfig(engine="server")  # started here


def test_the_list_file_is_waited_for_and_every_server_for_its_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servers, "PROGRESS_EVERY_S", 0.2)
    listing = tmp_path / "rollout_servers.txt"
    with _health_server() as a, _health_server(ready_after_s=1.5) as b:

        def publish() -> None:  # as slurm/rollout_servers.sbatch does: write, then rename
            (tmp_path / "list.tmp").write_text(f"{a}\n\n# the second node\n{b}/\n")
            (tmp_path / "list.tmp").rename(listing)

        threading.Timer(0.5, publish).start()
        cfg = RolloutConfig(engine="server", server_list=str(listing), engines=2, server_wait_s=20)
        cfg.validate()
        lines: list[str] = []
        start = time.monotonic()
        got = connect_servers(cfg, progress=lines.append)
        assert 1.5 <= time.monotonic() - start < 10
        assert got.server_urls == [a, b] and got.server_url == "" and got.server_list == ""
        assert any(line.startswith(f"waiting for the rollout server list {listing}") for line in lines)
        assert f"rollout servers from {listing}: {a}, {b}" in lines
        assert any(
            " of 2 rollout server(s) to be healthy: " in line and line.endswith(" s)") and b in line for line in lines
        )


def test_a_server_that_never_becomes_healthy_is_one_line_naming_its_url() -> None:
    dead = _closed_url()
    with _health_server() as alive, _health_server(ready_after_s=60) as late:
        cfg = RolloutConfig(engine="server", server_urls=[alive, dead, late], engines=3, server_wait_s=1.5)
        start = time.monotonic()
        with pytest.raises(ServersNotReady) as e:
            connect_servers(cfg, progress=lambda line: None)
        assert time.monotonic() - start < 8
    message = str(e.value)
    assert message == (
        f"rollout server {dead}, {late} never became healthy (GET /health) within 1.5 s (rollout.server_wait_s); "
        f"1 of 3 did"
    )


def test_a_list_that_never_appears_or_is_bad(tmp_path: Path) -> None:
    missing = tmp_path / "never.txt"
    cfg = RolloutConfig(engine="server", server_list=str(missing), server_wait_s=0.5)
    with pytest.raises(ServersNotReady, match=rf"^rollout\.server_list {missing} did not appear within 0\.5 s"):
        connect_servers(cfg, progress=lambda line: None)
    bad = tmp_path / "bad.txt"
    bad.write_text("http://a:1\nnode2:8000\n")
    with pytest.raises(ServersNotReady, match=r"line 2: 'node2:8000' is not an http:// or https:// URL"):
        read_server_list(bad)
    with _health_server() as a, _health_server() as b:
        two = tmp_path / "two.txt"
        two.write_text(f"{a}\n{b}\n")
        with pytest.raises(ConfigError, match=r"lists 2 server\(s\) but rollout\.engines=1; set rollout\.engines=2"):
            connect_servers(RolloutConfig(engine="server", server_list=str(two)), progress=lambda line: None)


def test_server_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.server_url and rollout\.server_list both name the servers"):
        RolloutConfig(engine="server", server_url="http://a:1", server_list="x.txt").validate()
    with pytest.raises(ConfigError, match=r"rollout\.server_urls\[1\] must start with http://"):
        RolloutConfig(engine="server", server_urls=["http://a:1", "b:2"], engines=2).validate()
    with pytest.raises(ConfigError, match=r"lists 2 servers but rollout\.engines=1; set rollout\.engines=2"):
        RolloutConfig(engine="server", server_urls=["http://a:1", "http://b:2"]).validate()
    with pytest.raises(ConfigError, match=r"rollout\.sleep_level=1 with rollout\.server_url"):
        RolloutConfig(engine="server", server_list="x.txt", sleep_level=1).validate()
    RolloutConfig(engine="server", server_urls=["http://a:1", "http://b:2"], engines=2).validate()


def test_the_transport_for_listed_servers() -> None:
    from qrl_megatron.bridge.config import SyncConfig

    listed = RolloutConfig(engine="server", server_list="servers.txt", engines=2)
    assert run_transport(SyncConfig(), listed, cuda=False) == "tcp"  # the rollout-server job's servers: elsewhere
    assert run_transport(SyncConfig(), listed, cuda=True) == "nccl"
    local = RolloutConfig(engine="server", server_urls=["http://127.0.0.1:1", "http://localhost:2"], engines=2)
    assert run_transport(SyncConfig(), local, cuda=False) == "shm"
    with pytest.raises(ConfigError, match=r"^sync\.transport=shm .* but the rollout\.server_list servers are on"):
        run_transport(SyncConfig(transport="shm"), listed, cuda=False)


def test_the_rollout_server_job_serves_the_rollout_format_with_the_tcp_backend(tmp_path: Path) -> None:
    """What slurm/rollout_servers.sbatch runs (launch/job_info.py prepare): the base exported in rollout.quant with
    the learner's bf16 exclusions, and --weight-transfer-config naming the backend the learner resolves for listed
    servers."""
    import json

    from launch import job_info
    from launch.common import load_checked_config
    from qrl_megatron.models.base import prepare_base_model

    cfg = load_checked_config(
        "configs/tiny_cpu.yaml", ["rollout.quant=nvfp4", f"run.dir={tmp_path / 'run'}", f"run.cache_dir={tmp_path}"]
    )
    base = Path(prepare_base_model(cfg.model, cfg.run.cache_dir))
    served = job_info.serve_model_dir(cfg, base)
    assert served == (tmp_path / "run" / "rollout_servers" / "rollout_model_nvfp4").resolve()
    quant = json.loads((served / "config.json").read_text())["quantization_config"]
    assert "lm_head" in json.dumps(quant)  # kept in bf16, as for an engine the learner starts
    args = job_info.vllm_serve_args(cfg, served)
    assert args[0] == str(served)
    assert json.loads(args[args.index("--weight-transfer-config") + 1]) == {"backend": "qrl_tcp"}
    assert job_info.WORKER_EXTENSION in args and "processed_logprobs" in args
    bf16 = load_checked_config("configs/tiny_cpu.yaml", [f"run.cache_dir={tmp_path}"])
    assert job_info.serve_model_dir(bf16, base) == base


def test_the_rollout_server_job_in_qerl_mode_serves_the_learners_frozen_base_with_its_lora_slot(
    tmp_path: Path,
) -> None:
    """learner.lora.rank > 0: the job serves the base exported as the learner exports its frozen base (no plan),
    the LoRA flags of a server the learner starts itself and a zero start-up adapter; vLLM's parser takes them;
    with a warm-start the learner has not trained yet, the wait ends in one line naming the fix."""
    import json

    from safetensors.torch import load_file

    from launch import job_info
    from launch.common import load_checked_config
    from qrl_megatron.models.base import prepare_base_model

    overrides = [
        "learner.lora.rank=8",
        f"run.dir={tmp_path / 'run'}",
        f"run.cache_dir={tmp_path}",
    ]
    cfg = load_checked_config("configs/tiny_cpu_qerl.yaml", [*overrides, "warmstart.enabled=false"])
    base = Path(prepare_base_model(cfg.model, cfg.run.cache_dir)).resolve()
    assert job_info.serve_policy_dir(cfg, base) == base
    served = job_info.serve_model_dir(cfg, base)
    assert served == (tmp_path / "run" / "rollout_servers" / "rollout_model_nvfp4").resolve()
    quant = json.dumps(json.loads((served / "config.json").read_text())["quantization_config"])
    assert "lm_head" in quant and "down_proj" not in quant  # no plan: every linear but lm_head quantized
    adapter = job_info.initial_adapter_dir(cfg, base)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all(not t.any() for t in weights.values())  # B = 0 (and A): the base itself
    args = job_info.vllm_serve_args(cfg, served, adapter)
    assert args[args.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in args
    assert json.loads(args[args.index("--lora-modules") + 1]) == {"name": "qrl-policy", "path": str(adapter)}
    assert json.loads(args[args.index("--weight-transfer-config") + 1]) == {"backend": "qrl_tcp"}
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    model, *rest = args
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", model, *rest])
    assert ns.enable_lora and ns.max_loras == 1 and ns.lora_modules[0].path == str(adapter)

    warm = load_checked_config("configs/tiny_cpu_qerl.yaml", overrides)
    with pytest.raises(
        ValueError, match=r"warm-started policy, and .* is not complete after 0\.2 s.*QRL_READY_TIMEOUT_S"
    ):
        job_info.serve_policy_dir(warm, base, wait_s=0.2)
