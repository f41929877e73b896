"""The trained policy as a complete Hugging Face model folder, streamed shard file by shard file.

``export_policy`` is collective over the learner world: :func:`~qrl_megatron.learner.model.iter_hf_tensors`
gathers one full tensor at a time (TP shards joined inside their group, PP stages sent to rank 0), and rank 0's
:class:`HFFolderWriter` buffers tensors until the next one would pass ``max_shard_bytes``, then flushes a
safetensors file -- so no rank ever holds the whole model. The folder gets, next to the shards and
``model.safetensors.index.json``, the base model's ``config.json`` (dtype set to the export dtype),
``generation_config.json`` (copied, or derived from the config when the base has none) and its tokenizer files.
It is written to ``<out>.partial`` and renamed into place only when complete (every expected tensor written).

``export_rollout_format`` turns such a folder into a quantized one for serving (te_ext's compressed-tensors
NVFP4 / FP8 / INT8 writer), written the same way.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qrl_megatron.learner.checkpoint import copy_hf_metadata
from qrl_megatron.models.registry import ModelSpec

__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "ROLLOUT_FORMATS",
    "TOKENIZER_FILES",
    "HFFolderWriter",
    "base_dtype",
    "expected_hf_names",
    "export_policy",
    "export_rollout_format",
]

INDEX_FILE = "model.safetensors.index.json"
# Any one of these makes a folder's tokenizer loadable (fast tokenizer, sentencepiece, BPE vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
# Export dtypes by their config.json spelling.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Quantized rollout formats a folder can be converted to (te_ext.vllm_export).
ROLLOUT_FORMATS = ("nvfp4", "fp8", "int8")
DEFAULT_MAX_SHARD_MIB = 2048


def base_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a HF folder's ``config.json`` declares (``dtype`` or ``torch_dtype``); bf16 when it names none."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    name = str(name).removeprefix("torch.")
    # "auto" (or anything unusual) says nothing about the weights: bf16 is what hubs publish.
    return DTYPES.get(name, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tokenizer(base_dir: Path) -> None:
    if not any((base_dir / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{base_dir} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); an exported folder needs "
            "them: save the tokenizer into the base model folder (tokenizer.save_pretrained)"
        )


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


class HFFolderWriter:
    """Writes HF-named tensors as size-limited safetensors shards + index into ``<out>.partial``, then renames.

    ``add`` tensors in the order they should appear; ``finish`` writes the index, ``config.json`` (with the export
    dtype), ``generation_config.json`` and the tokenizer from ``base_dir`` and moves the folder to ``out``
    (replacing an older one). Used as a context manager, an exception removes the partial folder.
    """

    def __init__(
        self,
        out_dir: str | Path,
        base_dir: str | Path,
        *,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_MIB * 2**20,
    ) -> None:
        self.out = Path(out_dir)
        self.base_dir = Path(base_dir)
        if not (self.base_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.base_dir} has no config.json; export needs the base model's HF folder")
        _check_tokenizer(self.base_dir)
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.dtype = dtype if dtype is not None else base_dtype(self.base_dir)
        self.max_shard_bytes = max_shard_bytes
        self.partial = self.out.with_name(self.out.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._files: list[str] = []
        self._weight_map: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self._total_bytes = 0
        self._done = False

    def __enter__(self) -> HFFolderWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    @property
    def names(self) -> list[str]:
        return list(self._weight_map)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._weight_map:
            raise ValueError(f"{name} was already written to this export")
        t = tensor.detach().cpu()
        if t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
        if not _owns_storage(t):
            t = t.clone()  # a view (a q/k/v or gate/up slice): safetensors refuses tensors that share storage
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._weight_map[name] = len(self._files)
        self._total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        # Numbered without the total (unknown until the end); renamed to model-i-of-n in finish().
        name = f"model-{len(self._files) + 1:05d}.safetensors"
        save_file(self._buffer, str(self.partial / name), metadata={"format": "pt"})
        self._files.append(name)
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self, expected: Iterable[str] | None = None) -> Path:
        """Flush, write the index and the base's files, and rename into place; ``expected``: names that must be there."""
        if expected is not None:
            missing = sorted(set(expected) - set(self._weight_map))
            extra = sorted(set(self._weight_map) - set(expected))
            if missing or extra:
                raise ValueError(f"export of {self.out} is incomplete: missing tensors {missing}, unexpected {extra}")
        if not self._weight_map:
            raise ValueError(f"export of {self.out}: no tensors were written")
        self._flush()
        count = len(self._files)
        final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for tmp, final in zip(self._files, final_names, strict=True):
            (self.partial / tmp).rename(self.partial / final)
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": {name: final_names[i] for name, i in self._weight_map.items()},
        }
        (self.partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

        copy_hf_metadata(self.base_dir, self.partial)
        config = json.loads((self.base_dir / "config.json").read_text())
        # The weights are full precision whatever the base was: a quantized base's settings no longer apply.
        config.pop("quantization_config", None)
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
        for key in keys:
            config[key] = _dtype_name(self.dtype)
        (self.partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not (self.partial / "generation_config.json").is_file():
            from transformers import AutoConfig, GenerationConfig

            GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(self.partial))).save_pretrained(
                str(self.partial)
            )

        shutil.rmtree(self.out, ignore_errors=True)
        self.partial.rename(self.out)
        self._done = True
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def expected_hf_names(spec: ModelSpec) -> list[str]:
    """Every HF tensor name a complete export of ``spec`` holds (no ``lm_head.weight`` when tied)."""
    from qrl_megatron.models.hf_mapping import megatron_param_hf_names, megatron_param_shapes

    return [hf for name in megatron_param_shapes(spec) for hf in megatron_param_hf_names(name)]


def export_policy(
    model: torch.nn.Module,
    spec: ModelSpec,
    layout: Any,
    out_dir: str | Path,
    base_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_MIB * 2**20,
    dst: int = 0,
) -> Path:
    """Collective: write this learner world's model (bare or DDP-wrapped stage) as a HF folder on rank ``dst``.

    ``dtype`` defaults to the base model's (:func:`base_dtype`); the tensors are cast before they travel.
    Every rank returns ``out_dir``; it is complete on ``dst``'s file system after the call.
    """
    import torch.distributed as dist

    from qrl_megatron.learner.model import iter_hf_tensors

    dtype = dtype if dtype is not None else base_dtype(base_dir)
    writer = None
    if dist.get_rank() == dst:
        writer = HFFolderWriter(out_dir, base_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    with writer if writer is not None else contextlib.nullcontext():
        for name, tensor in iter_hf_tensors(model, spec, layout, dst=dst, dtype=dtype):
            assert writer is not None  # only dst receives tensors
            writer.add(name, tensor)
        if writer is not None:
            writer.finish(expected_hf_names(spec))
    dist.barrier()
    return Path(out_dir)


def export_rollout_format(hf_dir: str | Path, out_dir: str | Path, fmt: str, **options: Any) -> Path:
    """A quantized copy of the HF folder ``hf_dir`` in rollout format ``fmt`` for serving, written atomically.

    te_ext's compressed-tensors writer (``te_ext.vllm_export``): decoder linears in ``fmt``, embeddings, norms and
    ``lm_head`` kept in the folder's dtype; vLLM loads it (``vllm serve OUT``). Options as ``te_ext.vllm_export``.
    """
    from te_ext.vllm_export import export_quantized_checkpoint

    if fmt not in ROLLOUT_FORMATS:
        raise ValueError(f"rollout format must be one of {', '.join(ROLLOUT_FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        export_quantized_checkpoint(hf_dir, partial, fmt, **options)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out
