"""Shared test fixtures. Tests never touch the network or the user's Hugging Face cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Set before any test module imports huggingface_hub/transformers (they read these at import time); spawned
# worker processes inherit them.
_HF_HOME = tempfile.mkdtemp(prefix="qrl-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_home() -> Path:
    """The temporary HF_HOME of this test session."""
    return Path(_HF_HOME)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, hf_home: Path) -> Path:
    """The tiny Qwen2 model (bf16 safetensors + tokenizer), built locally once per session."""
    from qrl_megatron.models.tiny import build_tiny_model

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HOME"] == str(hf_home)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def run_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`run.cache_dir` of every end-to-end `qrl-train` run: the tiny base and its warm-start are built once."""
    return tmp_path_factory.mktemp("qrl-cache")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, run_cache_dir: Path) -> Path:
    """One uninterrupted run of the default recipe (4 steps, a checkpoint every 2): its outputs are checked by
    tests/test_e2e.py, and tests/test_faults.py compares every interrupted run of the same command with it."""
    from e2e_utils import REFERENCE, qrl_train

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    qrl_train(run_dir, run_cache_dir, *REFERENCE)
    return run_dir


@pytest.fixture(scope="session")
def _tiny_engine_session(tiny_model_dir: Path):
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_model_dir), RolloutConfig(kv_cache_mib=64), seed=0, max_model_len=64)
    yield engine
    engine.close()


@pytest.fixture
def tiny_engine(_tiny_engine_session, tiny_model_dir: Path):
    """The colocated vLLM engine (bf16) on the tiny model, holding the model's own weights: one engine for the
    session (a start is ~30 s of CPU), its weights reloaded for every test that takes it, so no test sees another's."""
    from qrl_megatron.models.base import load_hf_weights

    weights = {k: v.to(torch.bfloat16) for k, v in load_hf_weights(tiny_model_dir).items() if k != "lm_head.weight"}
    _tiny_engine_session.load_weights(weights)
    return _tiny_engine_session


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real one-node Slurm cluster (tests/slurm_cluster.py) per test module (started in ~1 s, stopped when the
    module's tests are done, so no daemon outlives them): skipped, naming what is missing,
    where Slurm cannot start (no packages, not root); a cluster that should start but does not is an error."""
    from slurm_cluster import missing_piece, start_cluster

    why = missing_piece()
    if why is not None:
        pytest.skip(why)
    cluster = start_cluster()
    yield cluster
    cluster.stop()
