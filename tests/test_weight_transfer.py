"""The qrl_shm weight-transfer backend's reload-warning filter: quiet for what the bridge never sends, loud otherwise."""

from __future__ import annotations

import logging

import pytest

from qrl_megatron.rollout.weight_transfer import (
    RELOAD_LOGGER,
    RELOAD_WARNING,
    ExpectedReloadWarnings,
    expected_unsent_modules,
)

pytestmark = pytest.mark.unit


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _warnings_kept(tied: bool, modules: list[str]) -> list[str]:
    pytest.importorskip("vllm")
    from vllm.model_executor.model_loader.reload import layerwise

    logger = layerwise.logger  # the logger vLLM's reload writes to: the filter must sit on this one
    assert logger.name == RELOAD_LOGGER
    capture, quiet = _Capture(), ExpectedReloadWarnings(expected_unsent_modules(tied))
    logger.addHandler(capture)
    logger.addFilter(quiet)
    try:
        for module in modules:
            logger.warning(RELOAD_WARNING, module)
    finally:
        logger.removeFilter(quiet)
        logger.removeHandler(capture)
    return capture.messages


def test_the_warning_text_is_vllms() -> None:
    pytest.importorskip("vllm")
    import inspect

    from vllm.model_executor.model_loader.reload import layerwise

    assert f'"{RELOAD_WARNING}"' in inspect.getsource(layerwise)


def test_unsent_modules_are_quiet_and_real_misses_are_not() -> None:
    kept = _warnings_kept(True, ["RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"])
    assert kept == ["QKVParallelLinear: Failed to load weights"]


def test_an_untied_lm_head_that_received_nothing_is_reported() -> None:
    assert _warnings_kept(False, ["ParallelLMHead"]) == ["ParallelLMHead: Failed to load weights"]
