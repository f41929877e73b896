"""Reading HF safetensors folders as published, one slice at a time.

A folder is either sharded (``model.safetensors.index.json`` naming the shard of every tensor) or a single
``model.safetensors``. :class:`CheckpointReader` parses and validates the index and every shard's header up front
(a missing shard, a tensor the index places in a shard that does not hold it, or a tensor stored twice is a one-line
error naming the file), then reads tensor data on demand: :meth:`CheckpointReader.read_slice` reads only the bytes
of the requested rows or columns, so a learner rank holds its own shard and never the model.

Why ``pread`` and not ``safetensors.safe_open``: ``safe_open`` maps the whole file, and every page a slice touches
stays in the process's RSS (``RssFile``) until the file is unmapped. A column slice (row-parallel ``o_proj`` /
``down_proj``, split on dim 1) touches every page of the tensor, and the embedding rows of one rank are half the
file's largest tensor. Reading with ``os.preadv`` into a preallocated tensor (or a bounded scratch buffer for column
slices and dtype casts) puts the data in the page cache, which is not the process's memory, and the only resident
copy is the one the caller keeps. ``bench/load_rss.py`` measures both.

The safetensors layout read here (the format's specification): an 8-byte little-endian header length ``N``, ``N``
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data,
offsets relative to its start, little-endian, C order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointReader",
    "CheckpointSource",
    "StateDictReader",
    "TensorInfo",
    "as_checkpoint_reader",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype codes (the format's names) -> torch dtypes.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Column slices and casts go through a scratch buffer of at most this many bytes (one row when a row is larger):
# big enough that the reads are few and long, small next to any shard worth slicing.
_SCRATCH_BYTES = 16 << 20
# A header larger than this is a corrupt file, not a checkpoint (the format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file``, absolute byte ``offset``, its dtype and shape as stored."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code = entry.get("dtype")
        if code not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {code!r}, not one of {', '.join(_DTYPES)}")
        dtype, shape = _DTYPES[code], tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        info = TensorInfo(path, data_start + begin, dtype, shape)
        if end - begin != info.nbytes or end > data_size:
            raise ValueError(
                f"{path}: tensor {name} claims bytes [{begin}, {end}) of {data_size} for {code} {list(shape)} "
                f"({info.nbytes} bytes); the file is truncated or corrupt, download it again"
            )
        out[name] = info
    return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _writable_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t`` as a writable buffer (what ``os.preadv`` fills)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def _pread_into(fd: int, buf: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"{file}: unexpected end of file at byte {offset + done}; the file is truncated")
        done += n


class CheckpointReader(Mapping[str, torch.Tensor]):
    """A read-only, lazy ``Mapping`` of the HF tensors of a safetensors folder, plus slice reads.

    ``reader[name]`` reads one whole tensor (on-disk dtype) and keeps nothing: code that wants the full state dict
    (``dict(reader)``) still works, and pays for it only then. :meth:`read_slice` reads part of a tensor, cast to
    the caller's dtype one bounded chunk at a time.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_NAME
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"{self.model_dir}: no such model folder")
        if index.is_file():
            self._tensors = self._from_index(index)
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.model_dir} holds neither {INDEX_NAME} nor *.safetensors weights; "
                    "point model.source at a Hugging Face model folder"
                )
            self._tensors = {}
            for f in files:
                for name, info in _read_header(f).items():
                    if name in self._tensors:
                        raise ValueError(
                            f"{f}: tensor {name} is also stored in {self._tensors[name].file.name}; "
                            "remove the stray file or add an index"
                        )
                    self._tensors[name] = info

    def _from_index(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index.read_text(), object_pairs_hook=_no_duplicate_keys)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{index}: not a safetensors index ({e}); it needs a 'weight_map' of tensor -> file"
            ) from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (self.model_dir / shard).is_file():
                raise FileNotFoundError(
                    f"{self.model_dir / shard}: shard named by {INDEX_NAME} is missing; download it again"
                )
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in _read_header(self.model_dir / shard).items():
                if name in tensors:
                    raise ValueError(
                        f"{info.file}: tensor {name} is also stored in {tensors[name].file.name}; the shards overlap"
                    )
                if weight_map.get(name) != shard:
                    raise ValueError(
                        f"{info.file}: holds tensor {name}, which {INDEX_NAME} places "
                        f"{'in ' + str(weight_map[name]) if name in weight_map else 'nowhere'}; the index is stale"
                    )
                tensors[name] = info
        for name, shard in weight_map.items():
            if name not in tensors:
                raise ValueError(
                    f"{self.model_dir / shard}: holds no tensor {name}, which {INDEX_NAME} places there; "
                    "the index is stale or the shard is from another checkpoint"
                )
        unnamed = sorted({p.name for p in self.model_dir.glob("*.safetensors")} - set(shards))
        if unnamed:
            # transformers ignores them too; say so rather than drop them silently
            logger.warning("%s: ignoring %s, not named by %s", self.model_dir, ", ".join(unnamed), INDEX_NAME)
        return {name: tensors[name] for name in weight_map}

    # --------------------------------------------------------------------------------------------------------
    # Mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read_slice(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    # --------------------------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.model_dir}: no tensor {name!r} in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def where(self, name: str) -> str:
        """The file holding ``name`` (for error messages); the folder if no file holds it."""
        info = self._tensors.get(name)
        return str(info.file) if info is not None else str(self.model_dir)

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self._tensors.values()})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint (what the model weighs on disk)."""
        return sum(i.nbytes for i in self._tensors.values())

    def read_slice(
        self,
        name: str,
        dim: int = 0,
        start: int = 0,
        stop: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Indices ``[start, stop)`` of tensor ``name`` along ``dim`` (default: all of it), as ``dtype``.

        Reads only those bytes: a dim-0 slice is one contiguous range, read straight into the result when no cast
        is needed; any other slice (or a cast) goes through a scratch buffer of at most 16 MiB. ``out``: a
        contiguous CPU tensor of the slice's shape to fill (its dtype wins), else one is allocated.
        """
        info = self.info(name)
        shape = info.shape
        if not shape:
            shape = (1,)  # a 0-d tensor read as its one element
        if not 0 <= dim < len(shape):
            raise ValueError(f"{info.file}: tensor {name} {list(info.shape)} has no dim {dim}")
        stop = shape[dim] if stop is None else stop
        if not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"{info.file}: tensor {name} dim {dim} has size {shape[dim]}, asked [{start}, {stop})")
        out_shape = (*shape[:dim], stop - start, *shape[dim + 1 :])
        if out is None:
            out = torch.empty(out_shape, dtype=dtype or info.dtype)
        elif tuple(out.shape) != out_shape or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{name}: out {tuple(out.shape)} must be a contiguous CPU tensor of shape {out_shape}")
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
        fd = os.open(info.file, os.O_RDONLY)
        try:
            if outer == 1 or start == stop:
                self._read_range(fd, info, start * inner, stop * inner, out)
            else:
                self._read_strided(fd, info, outer, shape[dim] * inner, start * inner, stop * inner, out)
        finally:
            os.close(fd)
        return out.reshape(info.shape) if not info.shape and out.numel() == 1 else out

    @staticmethod
    def _read_range(fd: int, info: TensorInfo, first: int, last: int, out: torch.Tensor) -> None:
        """Elements ``[first, last)`` of the flattened tensor into ``out``: one range, cast chunk by chunk."""
        item = info.dtype.itemsize
        flat = out.reshape(-1)
        if out.dtype == info.dtype:
            _pread_into(fd, _writable_bytes(flat), info.offset + first * item, info.file)
            return
        per_chunk = max(1, _SCRATCH_BYTES // item)
        scratch = torch.empty(min(per_chunk, last - first), dtype=info.dtype)
        for a in range(first, last, per_chunk):
            n = min(per_chunk, last - a)
            _pread_into(fd, _writable_bytes(scratch[:n]), info.offset + a * item, info.file)
            flat[a - first : a - first + n].copy_(scratch[:n])

    @staticmethod
    def _read_strided(
        fd: int, info: TensorInfo, outer: int, row: int, first: int, last: int, out: torch.Tensor
    ) -> None:
        """Elements ``[first, last)`` of each of ``outer`` rows of ``row`` elements: whole rows are read a block
        at a time into the scratch buffer (fewer, longer reads than one per row) and the wanted columns copied out."""
        item = info.dtype.itemsize
        rows_per_block = max(1, _SCRATCH_BYTES // (row * item))
        scratch = torch.empty(min(rows_per_block, outer), row, dtype=info.dtype)
        dst = out.reshape(outer, last - first)
        for r in range(0, outer, rows_per_block):
            n = min(rows_per_block, outer - r)
            block = scratch[:n]
            _pread_into(fd, _writable_bytes(block), info.offset + r * row * item, info.file)
            dst[r : r + n].copy_(block[:, first:last])


class StateDictReader(Mapping[str, torch.Tensor]):
    """A plain state dict behind the reader's slice interface (tests, and callers that already hold tensors)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def where(self, name: str) -> str:
        return "the in-memory state dict"

    def read_slice(
        self,
        name: str,
        dim: int = 0,
        start: int = 0,
        stop: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self._tensors[name]
        piece = t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start)
        if out is None:
            return piece.to(dtype or t.dtype, copy=True).contiguous()
        return out.copy_(piece)


@runtime_checkable
class CheckpointSource(Protocol):
    """What the loader reads from: HF tensor names, their stored shapes, where each lives, and slice reads.

    :class:`CheckpointReader` (a folder on disk) and :class:`StateDictReader` (a state dict in memory) are two."""

    def __iter__(self) -> Iterator[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def where(self, name: str) -> str: ...

    def read_slice(
        self,
        name: str,
        dim: int = 0,
        start: int = 0,
        stop: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def as_checkpoint_reader(weights: Mapping[str, torch.Tensor] | CheckpointSource) -> CheckpointSource:
    """``weights`` with ``shape`` / ``where`` / ``read_slice``: a :class:`CheckpointSource` as is, a dict wrapped."""
    if isinstance(weights, CheckpointSource):
        return weights
    return StateDictReader(weights)
