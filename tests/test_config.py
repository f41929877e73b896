"""Typed config tree (`qrl_megatron.config`) and the `qrl-train` command line (`qrl_megatron.cli`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qrl_megatron.cli import main
from qrl_megatron.config import (
    ConfigError,
    LearnerConfig,
    QRLConfig,
    describe,
    load_config,
    to_dict,
    to_yaml,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "tiny_cpu.yaml")
ERROR_PREFIX = "qrl-train: config error: "


def _leaf_keys(node: dict, prefix: str = "") -> set[str]:
    """Dotted leaf keys of a nested dict (independent of `describe`)."""
    keys: set[str] = set()
    for name, value in node.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _config_error(message_parts: list[str], overrides: list[str], path: str | None = RECIPE) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for part in message_parts:
        assert part in message, (part, message)
    return message


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(ERROR_PREFIX)
    assert "Traceback" not in captured.err
    return captured.err


# --------------------------------------------------------------------------------------------- load_config
def test_defaults_without_recipe_are_the_dataclass_defaults() -> None:
    cfg = load_config()
    assert cfg == QRLConfig()
    assert cfg.learner.micro_batch_size == 32 and cfg.rollout.max_new_tokens == 8


def test_recipe_values_override_defaults_and_keep_the_rest() -> None:
    cfg = load_config(RECIPE)
    assert isinstance(cfg, QRLConfig)
    # set by the recipe (differs from the dataclass default)
    assert cfg.learner.micro_batch_size == 64
    assert cfg.rollout.max_new_tokens == 6
    assert cfg.task.num_train == 4000 and cfg.task.operations == "+"
    # not in the recipe: dataclass defaults
    assert cfg.algo.clip_high == 0.2 and cfg.algo.loss_agg == "token_mean"
    assert cfg.model.tiny.hidden_size == 128


def test_dotlist_overrides_are_typed_and_win_over_the_recipe() -> None:
    cfg = load_config(RECIPE, ["learner.tp=2", "learner.dp=2", "rollout.temperature=0.5", "task.operations=+-"])
    assert cfg.learner.tp == 2 and isinstance(cfg.learner.tp, int)
    assert cfg.learner.world_size == 4
    assert cfg.rollout.temperature == 0.5 and isinstance(cfg.rollout.temperature, float)
    assert cfg.task.operations == "+-"
    assert LearnerConfig(tp=2, pp=3, dp=5).world_size == 30


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("learner.tpp=2", "did you mean 'learner.tp'?"),
        ("sed=1", "did you mean 'seed'?"),
        ("model.tiny.hiden_size=64", "did you mean 'model.tiny.hidden_size'?"),
    ],
)
def test_unknown_key_names_the_dotted_key_and_suggests(override: str, suggestion: str) -> None:
    key = override.split("=")[0]
    message = _config_error([f"'{key}'", suggestion], [override])
    assert message.startswith("unknown config key")


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    message = _config_error(["learner.zzzzzzzz"], ["learner.zzzzzzzz=1"])
    assert "did you mean" not in message


def test_unknown_key_in_the_yaml_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learner:\n  tpp: 2\n")
    _config_error(["'learner.tpp'", "did you mean 'learner.tp'?"], [], str(recipe))


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("learner.tp=two", ["learner.tp", "two"]),
        ("rollout.temperature=hot", ["rollout.temperature", "hot"]),
        ("rollout.quant=nvfp5", ["rollout.quant", "nvfp5", "bf16"]),
        ("algo.advantage=grpoo", ["algo.advantage", "did you mean 'grpo'?"]),
        ("learner.precision=fp16", ["learner.precision", "fp32", "bf16"]),
        ("algo.clip_low=1.5", ["algo.clip_low=1.5", "[0.0, 1.0]"]),
        ("learner.lr=0", ["learner.lr=0", "> 0"]),
        ("task.max_digits=7", ["task.max_digits=7"]),
        ("task.operations=+/", ["task.operations"]),
        ("model.tiny.vocab_size=60", ["model.tiny.vocab_size=60", "multiple of 8"]),
        ("model.tiny.num_attention_heads=3", ["model.tiny.hidden_size", "model.tiny.num_attention_heads"]),
        ("model.source=/no/such/model", ["model.source"]),
        ("task.name=files", ["task.data_files"]),
        ("sync.method=delta", ["sync.method", "full"]),
    ],
)
def test_bad_values_name_the_key(override: str, parts: list[str]) -> None:
    _config_error(parts, [override])


def test_cross_field_batch_checks() -> None:
    # 32 prompts * 8 samples = 256 sequences; 256 % 3 != 0
    _config_error(["256", "learner.dp * algo.minibatches = 3"], ["algo.minibatches=3", "rollout.prompts_per_step=32"])
    # 256 per rank per update, micro-batch 3 does not divide it
    _config_error(["learner.micro_batch_size=3", "256"], ["learner.micro_batch_size=3", "rollout.prompts_per_step=32"])
    # warm-start batch 64 is not divisible by dp=3 (256 % 3 != 0 too, so make the RL batch fit: 24 * 8 = 192)
    _config_error(["warmstart.batch_size", "learner.dp=3"], ["learner.dp=3", "rollout.prompts_per_step=24"])
    # valid: 3 * 8 = 24 sequences over dp=2 -> 12 per rank, micro-batch 64 > 12 is allowed
    cfg = load_config(RECIPE, ["rollout.prompts_per_step=3", "learner.dp=2"])
    assert cfg.learner.dp == 2


def test_missing_and_non_mapping_recipe(tmp_path: Path) -> None:
    _config_error(["not found", "nope.yaml"], [], str(tmp_path / "nope.yaml"))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    _config_error(["mapping"], [], str(listing))


def test_malformed_override() -> None:
    _config_error(["'learner.tp'", "key=value"], ["learner.tp"])
    _config_error(["'=2'", "key=value"], ["=2"])


def test_to_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(RECIPE, ["learner.lr=0.25", "algo.loss_agg=seq_mean", "model.tiny.num_layers=2"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg
    assert to_dict(cfg)["learner"]["lr"] == 0.25
    assert to_dict(cfg)["model"]["tiny"]["num_layers"] == 2


def test_describe_covers_every_leaf_with_a_doc() -> None:
    rows = describe()
    keys = [key for key, _, _ in rows]
    expected = _leaf_keys(OmegaConf.to_container(OmegaConf.structured(QRLConfig)))
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected
    assert {"seed", "learner.tp", "rollout.quant", "algo.clip_high", "model.tiny.hidden_size"} <= set(keys)
    assert all(text for _, _, text in rows), [key for key, _, text in rows if not text]
    defaults = {key: default for key, default, _ in rows}
    assert defaults["learner.tp"] == 1 and defaults["algo.clip_high"] == 0.2 and defaults["rollout.quant"] == "bf16"


# --------------------------------------------------------------------------------------------- cli
def test_cli_bad_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([RECIPE, "learner.tpp=2"]) == 2
    err = _one_error_line(capsys)
    assert "learner.tpp" in err and "did you mean 'learner.tp'?" in err


def test_cli_bad_quant_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([RECIPE, "rollout.quant=nvfp5"]) == 2
    err = _one_error_line(capsys)
    assert "rollout.quant" in err and "nvfp5" in err


def test_cli_string_for_int(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([RECIPE, "learner.tp=two"]) == 2
    err = _one_error_line(capsys)
    assert "learner.tp" in err and "two" in err


def test_cli_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([str(tmp_path / "missing.yaml"), "learner.tp=1"]) == 2
    err = _one_error_line(capsys)
    assert "missing.yaml" in err and "not found" in err


def test_cli_malformed_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([RECIPE, "learner.tp"]) == 2
    err = _one_error_line(capsys)
    assert "learner.tp" in err and "key=value" in err


def test_cli_print_config_shows_merged_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([RECIPE, "learner.lr=0.5", "rollout.temperature=0.7", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    printed = OmegaConf.create(captured.out)
    assert printed.learner.lr == 0.5
    assert printed.rollout.temperature == 0.7
    assert printed.learner.micro_batch_size == 64  # from the recipe
    assert printed.algo.clip_high == 0.2  # default
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(captured.out)
    assert load_config(dumped) == load_config(RECIPE, ["learner.lr=0.5", "rollout.temperature=0.7"])


def test_cli_print_config_overrides_only(capsys: pytest.CaptureFixture[str]) -> None:
    # no recipe: the first positional is an override, merged onto the built-in defaults
    assert main(["learner.lr=0.5", "--print-config"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.learner.lr == 0.5
    assert printed.learner.micro_batch_size == 32


def test_cli_help_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help-config"]) == 0
    keys_part, _, recipes_part = capsys.readouterr().out.partition("\n\n")  # the key table, then the recipes
    lines = keys_part.splitlines()
    listed = [line.split()[0] for line in lines]
    expected = _leaf_keys(OmegaConf.to_container(OmegaConf.structured(QRLConfig)))
    assert len(listed) == len(expected)
    assert set(listed) == expected
    by_key = {line.split()[0]: line for line in lines}
    assert "tensor-parallel size" in by_key["learner.tp"]
    assert "'bf16'" in by_key["rollout.quant"]
    assert "tiny_cpu.yaml" in recipes_part  # the recipes follow the keys (every one: tests/test_recipes.py)


def test_cli_subprocess_bad_key_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qrl_megatron.cli", "configs/tiny_cpu.yaml", "learner.tpp=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert "learner.tpp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_docs_config_reference_is_current() -> None:
    from pathlib import Path

    from qrl_megatron.config import reference_markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert path.read_text() == reference_markdown(), "regenerate: python -m qrl_megatron.config > docs/config.md"


def test_existing_run_dir_is_archived_or_refused(tmp_path, capsys) -> None:
    from qrl_megatron.cli import _prepare_run_dir
    from qrl_megatron.config import ConfigError, load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    refuse = load_config(None, [f"run.dir={run_dir}", "run.on_existing=error"])
    with pytest.raises(ConfigError, match="run.on_existing"):
        _prepare_run_dir(refuse.run, refuse.trainer)
    cfg = load_config(None, [f"run.dir={run_dir}"])
    _prepare_run_dir(cfg.run, cfg.trainer)
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert not run_dir.exists() and len(archived) == 1
    assert (archived[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_the_rollout_server_jobs_files_in_run_dir_are_not_an_earlier_run(tmp_path) -> None:
    """The rollout-server job writes its exports and server list into run.dir, often before the learner starts:
    they alone are not a run (nothing archived), and archiving an earlier run leaves them where the servers read
    them (the servers lost their model folder when the whole run.dir was moved)."""
    from qrl_megatron.cli import _prepare_run_dir
    from qrl_megatron.config import load_config

    run_dir = tmp_path / "run"
    (run_dir / "rollout_servers" / "rollout_model_nvfp4").mkdir(parents=True)
    (run_dir / "rollout_servers.txt").write_text("http://127.0.0.1:8000\n")
    cfg = load_config(None, [f"run.dir={run_dir}", "run.on_existing=error"])
    _prepare_run_dir(cfg.run, cfg.trainer)  # not an earlier run: no refusal
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = load_config(None, [f"run.dir={run_dir}"])
    _prepare_run_dir(cfg.run, cfg.trainer)
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(archived) == 1 and (archived[0] / "metrics.jsonl").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["rollout_servers", "rollout_servers.txt"]
    assert (run_dir / "rollout_servers" / "rollout_model_nvfp4").is_dir()


def test_a_run_dir_with_a_checkpoint_is_continued_unless_resume_is_never(tmp_path) -> None:
    from qrl_megatron.cli import _prepare_run_dir
    from qrl_megatron.config import ConfigError, load_config
    from qrl_megatron.learner.resume import CheckpointStore

    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir / "checkpoints")
    store.begin(2)
    store.commit(2)
    cfg = load_config(None, [f"run.dir={run_dir}"])  # trainer.resume=auto
    _prepare_run_dir(cfg.run, cfg.trainer)
    assert run_dir.is_dir(), "auto-resume must continue the run in place, not archive it"
    missing = load_config(None, [f"run.dir={run_dir}", f"trainer.resume={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="trainer.resume=.*no such checkpoint folder"):
        _prepare_run_dir(missing.run, missing.trainer)
    never = load_config(None, [f"run.dir={run_dir}", "trainer.resume=never"])
    _prepare_run_dir(never.run, never.trainer)
    assert not run_dir.exists()
