"""QeRL mode against a listed rollout server over TCP: the learner job and the rollout-server job side by side.

As on a cluster (slurm/rollout_servers.sbatch next to the learner job): `qrl-train` starts first and waits for its
server (``rollout.server_urls``, ``sync.transport=tcp``); the server side runs the job's own ``launch.job_info
prepare`` -- which waits for the learner's warm-start, exports it as the learner exports its frozen NVFP4 base,
writes the zero start-up adapter and prints the `vllm serve` arguments with the LoRA slot and the ``qrl_tcp``
backend -- and starts `vllm serve` with them on loopback. Every step's adapter (and, AQN on, the norms) then goes
down the worker's TCP stream; the bytes per step are the adapter's and the logprob probe after every sync passes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_utils import REPO, qrl_train_command, read_metrics

pytestmark = pytest.mark.e2e

QERL = (
    "learner.lora.rank=8",
    "learner.lora.alpha=16",
    "learner.lr=1e-3",
    "trainer.checkpoint=false",
    "learner.base_format=nvfp4",
    "rollout.quant=nvfp4",
    "algo.aqn.enabled=true",  # the norms ride along every sync: qrl_set_norms over the stream too
    "algo.aqn.stages=2",
    "trainer.max_steps=2",
    "sync.probe_every=1",
    "rollout.engine=server",
    "sync.transport=tcp",
    "rollout.server_wait_s=300",
)


def test_qerl_trains_against_a_listed_server_with_the_adapter_on_the_tcp_stream(
    run_cache_dir: Path, tmp_path: Path
) -> None:
    from launch.common import load_checked_config
    from qrl_megatron.lora.adapter import adapter_bytes, norm_shapes
    from qrl_megatron.models.base import prepare_base_model
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.rollout.engine import LAUNCHER_ENV
    from qrl_megatron.utils.net import free_port

    port = free_port("127.0.0.1")
    run_dir = tmp_path / "run"
    command = qrl_train_command(run_dir, run_cache_dir, *QERL, f"rollout.server_urls=[http://127.0.0.1:{port}]")
    config, overrides = command[3], command[4:]
    # the base first, here: both jobs would otherwise build it into the cache at once
    prepare_base_model(load_checked_config(config, overrides).model, str(run_cache_dir))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    start = time.perf_counter()
    learner = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server: subprocess.Popen | None = None
    try:
        prepared = subprocess.run(
            [sys.executable, "-m", "launch.job_info", "prepare", "--wait-s", "300", config, *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=330, env=env, check=False,
        )  # fmt: skip
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        serve_args = subprocess.run(
            ["bash", "-c", prepared.stdout + 'printf "%s\\n" "${QRL_SERVE_ARGS[@]}"'],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert "--enable-lora" in serve_args and '{"backend": "qrl_tcp"}' in serve_args
        print(f"\njob_info prepare (waited for the learner's warm-start): {time.perf_counter() - start:.1f} s")
        log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the server's lifetime is the test's
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *serve_args,
             "--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "1", "--disable-uvicorn-access-log"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**env, "VLLM_SERVER_DEV_MODE": "1"},
            start_new_session=True,
        )  # fmt: skip
        out, _ = learner.communicate(timeout=500)
        tail = (tmp_path / "server.log").read_text(errors="replace")[-3000:]
        assert learner.returncode == 0, f"qrl-train failed:\n{out[-6000:]}\nserver log:\n{tail}"
    finally:
        if learner.poll() is None:
            learner.kill()
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    print(f"learner + rollout-server pair, 2 QeRL steps over TCP: {time.perf_counter() - start:.1f} s")

    policy = Path(json.loads((run_dir / "eval.json").read_text())["policy"])
    spec = load_spec(policy)
    expected = adapter_bytes(spec, 8) + 2 * sum(s[0] for s in norm_shapes(spec).values())
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sync_bytes"] == expected and row["sync_base_bytes"] == 0
        assert row["probe_gap_mean"] < 0.05, row  # the engine serves the adapter the learner sent
    initial = json.loads((run_dir / "eval.json").read_text())["initial_sync"]
    assert initial["sync_bytes"] == expected and initial["probe_gap_mean"] < 0.05
    print(
        "QeRL sync over TCP per step: "
        + ", ".join(f"{r['sync_bytes'] / 1024:.1f} KiB in {r['sync_seconds']:.3f} s" for r in rows)
        + f"; probe gap mean {max(r['probe_gap_mean'] for r in rows):.4f}"
    )
