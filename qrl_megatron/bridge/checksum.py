"""Per-tensor checksums of streamed weights, computed the same way by the sender and by the engine's receiver.

CRC-32 of the raw bytes: exact (a single flipped bit changes it, unlike a float sum), independent of dtype (bf16,
fp8 and packed FP4 bytes hash alike) and fast enough (GB/s) that checking every tensor of every sync is cheap next
to moving it.

A tensor on a GPU gets a device-side checksum instead (:func:`word_checksum`, prefix ``wsum:``), so checking a
device transport (CUDA IPC, NCCL) never copies the tensor to host memory: its bytes are read as int32 words in rows
of 2^16, and each row's plain sum and position-weighted sum (weights 1..2^16) are computed exactly in int64 on the
device (|word| < 2^31, so a row's weighted sum stays below 2^62: no overflow, and integer sums do not depend on the
reduction order, so a CPU and a GPU get identical values). Only those two int64 values per 256 KiB row reach the
host, where a CRC-32 folds them (16 bytes per 256 KiB: 1/16384 of the tensor). A flipped bit changes its row's plain
sum by 2^k; two different words swapped within a row change the weighted sum; whole rows swapped change the order
of the folded values. The receiver computes whichever kind the sender's manifest names (by the prefix), so a GPU
sender and a CPU receiver (the shared-memory transport) agree.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

WORD_CHECKSUM_PREFIX = "wsum:"
_ROW_WORDS = 1 << 16  # int32 words per row: a row's weighted sum stays below 2^31 * 2^31 = 2^62
_SLAB_ROWS = 256  # rows widened to int64 at once (2 x 128 MiB of scratch on the device)


def _header(t: torch.Tensor) -> bytes:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode()


def crc32_checksum(tensor: torch.Tensor) -> str:
    """Hex CRC-32 of a tensor's bytes (row-major), prefixed by its dtype and shape so a reshaped copy differs."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().data
    return f"{zlib.crc32(raw, zlib.crc32(_header(t))):08x}"


def word_checksum(tensor: torch.Tensor) -> str:
    """Device-side checksum (module docstring): exact int64 row sums of the tensor's int32 words on its own device,
    folded by a CRC-32 on the host; the same value on any device."""
    t = tensor.detach()
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    if raw.storage_offset() % 4:  # an int32 view needs 4-byte alignment: a device copy, never a host one
        raw = raw.clone()
    n_words = raw.numel() // 4
    words = raw[: n_words * 4].view(torch.int32)
    weights = torch.arange(1, _ROW_WORDS + 1, dtype=torch.int64, device=t.device)
    parts: list[torch.Tensor] = []

    def add(rows: torch.Tensor) -> None:  # rows: [n, <= _ROW_WORDS] int64
        parts.append(rows.sum(dim=1))
        parts.append((rows * weights[: rows.shape[1]]).sum(dim=1))

    full = n_words // _ROW_WORDS * _ROW_WORDS
    for start in range(0, full, _SLAB_ROWS * _ROW_WORDS):
        stop = min(full, start + _SLAB_ROWS * _ROW_WORDS)
        add(words[start:stop].view(-1, _ROW_WORDS).to(torch.int64))
    if full < n_words:
        add(words[full:].to(torch.int64).unsqueeze(0))
    if raw.numel() > n_words * 4:  # the last 1-3 bytes
        add(raw[n_words * 4 :].to(torch.int64).unsqueeze(0))
    digest = torch.cat(parts).cpu().numpy().tobytes() if parts else b""
    return f"{WORD_CHECKSUM_PREFIX}{zlib.crc32(digest, zlib.crc32(_header(t))):08x}"


def tensor_checksum(tensor: torch.Tensor, like: str | None = None) -> str:
    """The checksum of a tensor: of the kind ``like`` (a sender's checksum) names, else CRC-32 for a tensor in host
    memory and :func:`word_checksum` for one on a device (no host copy)."""
    if like is not None:
        return word_checksum(tensor) if like.startswith(WORD_CHECKSUM_PREFIX) else crc32_checksum(tensor)
    return crc32_checksum(tensor) if tensor.device.type == "cpu" else word_checksum(tensor)


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_checksum(t) for name, t in tensors.items()}


class WeightVerificationError(RuntimeError):
    """The engine received (or holds) weights that differ from what the learner sent."""


def compare_checksums(expected: Mapping[str, str], received: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`WeightVerificationError` naming every tensor that is missing, unexpected or altered."""
    problems = [f"{name}: missing" for name in expected if name not in received]
    problems += [f"{name}: not in the sender's manifest" for name in received if name not in expected]
    problems += [
        f"{name}: checksum {got} != sent {expected[name]}"
        for name, t in received.items()
        if name in expected and (got := tensor_checksum(t, like=expected[name])) != expected[name]
    ]
    if problems:
        raise WeightVerificationError("weight sync corrupted in transit: " + "; ".join(problems))
