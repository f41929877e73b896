"""Shared test fixtures. Tests never touch the network or the user's Hugging Face cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
