"""Run checkpoints: atomic sealing, the manifest gate (truncation, corruption, strays), rotation, RNG state."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from qrl_megatron.learner.resume import CheckpointStore, capture_rng_state, restore_rng_state, verify_checkpoint

pytestmark = pytest.mark.unit


def _save(store: CheckpointStore, step: int, payload: bytes = b"weights") -> None:
    folder = store.begin(step)
    (folder / "learner").mkdir()
    (folder / "learner" / "shard0.bin").write_bytes(payload * 1000)
    (folder / "state.json").write_text(f'{{"step": {step}}}')
    store.commit(step)


def test_commit_seals_a_verifiable_folder_and_leaves_no_partial(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 5)
    assert store.steps() == [5]
    assert verify_checkpoint(store.path(5)) is None
    assert not store.partial(5).exists()
    assert store.latest_good() == store.path(5)


def test_an_unsealed_partial_folder_is_never_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    folder = store.begin(2)  # a save killed before commit
    (folder / "state.json").write_text("{}")
    assert store.steps() == [1]
    assert store.latest_good() == store.path(1)
    assert "no MANIFEST.json" in verify_checkpoint(folder)


@pytest.mark.parametrize("fault", ["truncate", "corrupt", "delete", "stray", "manifest"])
def test_the_manifest_gate_fires_and_the_previous_good_checkpoint_is_used(tmp_path, fault, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 1)
    _save(store, 2, payload=b"newer")
    shard = store.path(2) / "learner" / "shard0.bin"
    if fault == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif fault == "corrupt":
        data = bytearray(shard.read_bytes())
        data[10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif fault == "delete":
        shard.unlink()
    elif fault == "stray":
        (store.path(2) / "leftover.tmp").write_text("x")
    else:
        (store.path(2) / "MANIFEST.json").write_text("{not json")
    expected = {
        "truncate": "truncated",
        "corrupt": "sha256",
        "delete": "missing",
        "stray": "not in the manifest",
        "manifest": "unreadable",
    }[fault]
    assert expected in verify_checkpoint(store.path(2))
    with caplog.at_level(logging.WARNING):
        assert store.latest_good() == store.path(1)
    assert "step_00000002" in caplog.text and expected in caplog.text


def test_rotation_removes_old_checkpoints_only_after_the_new_one_is_sealed(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        _save(store, step)
    assert store.steps() == [20, 30]
    folder = store.begin(40)  # interrupted: nothing of the good ones is gone
    (folder / "state.json").write_text("{}")
    assert store.steps() == [20, 30]


def test_no_checkpoint_at_all(tmp_path):
    assert CheckpointStore(tmp_path / "missing").latest_good() is None
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointStore(tmp_path, keep=0)


def test_rng_state_round_trip_reproduces_every_generator():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def _sealed_run_state(store: CheckpointStore, step: int, settings: dict) -> None:
    import json

    folder = store.begin(step)
    (folder / "run_state.json").write_text(json.dumps({"step": step, "settings": settings}))
    store.commit(step)


SETTINGS = {
    "model": {"source": "tiny"},
    "rollout": {"quant": "nvfp4", "temperature": 1.0},
    "learner": {"tp": 2, "pp": 1, "dp": 1, "precision": "fp32"},
    "trainer": {"max_steps": 10},
}


def test_resume_allows_harmless_changes_and_says_the_layout_is_resharded(tmp_path, capsys):
    from qrl_megatron.learner.resume import plan_resume

    store = CheckpointStore(tmp_path)
    _sealed_run_state(store, 4, SETTINGS)
    now = {**SETTINGS, "learner": {**SETTINGS["learner"], "tp": 1}, "trainer": {"max_steps": 20}}
    path, error = plan_resume("auto", store, now)
    assert error is None and path == str(store.path(4))
    out = capsys.readouterr().out
    assert "TPxPPxDP 2x1x1 -> 1x1x1" in out and "trainer.max_steps" in out


@pytest.mark.parametrize(
    ("key", "change"),
    [("model", {"model": {"source": "/other/model"}}), ("rollout.quant", {"rollout": {"quant": "bf16"}})],
)
def test_resume_with_settings_that_change_the_checkpoints_meaning_is_an_error_naming_them(tmp_path, key, change):
    from qrl_megatron.learner.resume import plan_resume

    store = CheckpointStore(tmp_path)
    _sealed_run_state(store, 4, SETTINGS)
    path, error = plan_resume("auto", store, {**SETTINGS, **change})
    assert path is None and f"{key}:" in error and "cannot resume" in error


def test_resume_never_and_bad_explicit_paths(tmp_path):
    from qrl_megatron.learner.resume import plan_resume

    store = CheckpointStore(tmp_path / "checkpoints")
    _sealed_run_state(store, 2, SETTINGS)
    assert plan_resume("never", store, SETTINGS) == (None, None)
    assert "no such checkpoint folder" in plan_resume(str(tmp_path / "missing"), store, SETTINGS)[1]
    broken = store.begin(3)  # never sealed
    assert "not a good checkpoint" in plan_resume(str(broken), store, SETTINGS)[1]


def test_metrics_logger_resumes_after_the_checkpoint_step_without_duplicates(tmp_path):
    import json

    from qrl_megatron.metrics.logger import MetricsLogger, read_metrics

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )  # steps 3 and a cut-short 4 were logged after the step-2 checkpoint
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False, resume_step=2)
    logger.log(3, {"loss": 0.33})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 0.1), (2, 0.2), (3, 0.33)]
    with pytest.raises(ValueError, match="expected 5"):
        MetricsLogger(tmp_path, tensorboard=False, progress=False, resume_step=5)
