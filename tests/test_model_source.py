"""`model.source` as a local folder or a hub id (read from the local HF cache), and the base model's tokenizer.

The hub cache is a fake one, built under the session's temporary HF_HOME (tests/conftest.py; offline) in the
layout huggingface_hub writes: ``hub/models--ORG--NAME/snapshots/<revision>/...`` with ``refs/main`` naming the
revision. The model in it is a small locally built one (``models.families``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from qrl_megatron.cli import main
from qrl_megatron.config import ConfigError, ModelConfig, load_config
from qrl_megatron.models.base import load_tokenizer, prepare_base_model
from qrl_megatron.models.config import is_hub_id
from qrl_megatron.models.families import build_family_model
from qrl_megatron.models.registry import load_spec

pytestmark = pytest.mark.unit

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_model("qwen2.5", tmp_path_factory.mktemp("family") / "qwen2.5")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_model("llama3", tmp_path_factory.mktemp("family") / "llama3")


def cache_model(hf_home: Path, repo_id: str, source: Path | None) -> Path:
    """Put ``source``'s files into the fake hub cache as ``repo_id`` (``None``: a snapshot with config.json only)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    if source is None:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    else:
        shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.mark.parametrize(
    ("source", "hub"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", True),
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("org/name.v2", True),
        ("gpt2", False),  # a bare name: more likely a mistyped folder than a hub id
        ("/abs/path", False),
        ("./rel/path", False),
        ("a/b/c", False),
        ("org/../name", False),
        ("org--x/name", False),
    ],
)
def test_hub_id_spelling(source: str, hub: bool) -> None:
    assert is_hub_id(source) is hub


def test_validate_accepts_hub_ids_and_folders_only(tmp_path: Path) -> None:
    ModelConfig(source="Qwen/Qwen2.5-7B-Instruct").validate()  # spelling only: recipes validate before a download
    ModelConfig(source=str(tmp_path)).validate()
    for bad in ("/no/such/model", "no/such/local/folder", "gpt2"):
        with pytest.raises(ConfigError, match=r"model\.source") as err:
            ModelConfig(source=bad).validate()
        assert "hub id" in str(err.value) and "\n" not in str(err.value)


def test_hub_id_resolves_from_the_local_cache(hf_home: Path, family_dir: Path) -> None:
    snapshot = cache_model(hf_home, "testorg/cached-qwen", family_dir)
    cfg = load_config(None, ["model.source=testorg/cached-qwen"])
    folder = prepare_base_model(cfg.model, hf_home / "unused")
    assert folder == snapshot
    assert load_spec(folder) == load_spec(family_dir)


def test_local_folder_is_used_as_is(family_dir: Path, tmp_path: Path) -> None:
    assert prepare_base_model(ModelConfig(source=str(family_dir)), tmp_path) == family_dir


def test_hub_id_not_cached_offline_is_one_line_saying_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        prepare_base_model(ModelConfig(source="testorg/never-downloaded"), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "model.source='testorg/never-downloaded'" in message
    assert "hf download testorg/never-downloaded" in message and "HF_HUB_OFFLINE=0" in message


def test_partial_cached_copy_is_an_error(hf_home: Path, tmp_path: Path) -> None:
    cache_model(hf_home, "testorg/partial", None)
    with pytest.raises(ConfigError, match=r"\*\.safetensors.*hf download testorg/partial"):
        prepare_base_model(ModelConfig(source="testorg/partial"), tmp_path)


def test_cli_not_cached_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["model.source=testorg/not-in-cache", f"run.dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf download testorg/not-in-cache" in err, err


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_with_pad_is_loaded_as_saved(family_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(family_dir)
    saved = json.loads((family_dir / "tokenizer_config.json").read_text())
    assert (tok.pad_token, tok.eos_token) == (saved["pad_token"], saved["eos_token"])
    assert tok.pad_token_id != tok.eos_token_id
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert again.encode("12+34=46", add_special_tokens=False) == tok.encode("12+34=46", add_special_tokens=False)


def test_tokenizer_without_pad_pads_with_eos_and_says_so_once(
    llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Llama 3 publishes no pad token: drop it from a copy of the tokenizer (a Llama folder: transformers'
    # Qwen2Tokenizer would default the pad to <|endoftext|> by itself)
    folder = tmp_path / "no-pad"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="qrl_megatron.models.base"):
        tok = load_tokenizer(folder)
        load_tokenizer(folder)
    assert tok.pad_token_id == tok.eos_token_id is not None
    said = [r.getMessage() for r in caplog.records if "no pad token" in r.getMessage()]
    assert len(said) == 1 and str(folder) in said[0] and "eos" in said[0]


def test_folder_without_tokenizer_is_one_line_naming_it(family_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for f in family_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "tokenizer.json" in message
