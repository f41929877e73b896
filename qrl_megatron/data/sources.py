"""Where rows come from: local files (json/jsonl/parquet/csv, globs), a `save_to_disk` folder, or a hub dataset
already in the local Hugging Face cache. Always through `datasets`; never a download behind the user's back."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from qrl_megatron.config_fields import ConfigError

__all__ = ["read_dataset", "read_files"]

_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def read_files(spec: str, key: str) -> Dataset:
    """Every file named by `spec` (paths, globs, comma separated) as one Dataset."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise ConfigError(f"{key}={part!r}: file not found")
        paths += matches
    kinds = {_KINDS.get(Path(p).suffix) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(f"{key}={spec!r}: use .json, .jsonl, .parquet or .csv files, all of one kind")
    return load_dataset(kinds.pop(), data_files=paths, split="train")  # type: ignore[arg-type, return-value]


def read_dataset(name: str, config: str, split: str, key: str) -> Dataset:
    """A `save_to_disk` folder (its `split` when it holds several) or a hub dataset from the local cache."""
    if Path(name).is_dir():
        data = load_from_disk(name)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ConfigError(f"{key}={name!r} has splits {sorted(data)}, not {split!r}; set the split key")
            return data[split]
        return data
    try:
        return load_dataset(name, config or None, split=split)  # type: ignore[return-value]
    except Exception as err:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        how = (
            f"it is not in the local HF cache and the hub is offline; fetch it once on a connected machine with "
            f"`python -c \"import datasets; datasets.load_dataset('{name}'{', ' + repr(config) if config else ''})\"` "
            "(same HF_HOME), or save it with save_to_disk / to_parquet and point the key at that"
            if offline or "offline" in str(err).lower() or "connect" in str(err).lower()
            else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise ConfigError(f"{key}={name!r} (split {split!r}) cannot be read: {how}") from None
