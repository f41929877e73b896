"""Per-tensor checksums of streamed weights, computed the same way by the sender and by the engine's receiver.

CRC-32 of the raw bytes: exact (a single flipped bit changes it, unlike a float sum), independent of dtype (bf16,
fp8 and packed FP4 bytes hash alike) and fast enough (GB/s) that checking every tensor of every sync is cheap next
to moving it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Hex CRC-32 of a tensor's bytes (row-major), prefixed by its dtype and shape so a reshaped copy differs."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().data
    header = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode()
    return f"{zlib.crc32(raw, zlib.crc32(header)):08x}"


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_checksum(t) for name, t in tensors.items()}


class WeightVerificationError(RuntimeError):
    """The engine received (or holds) weights that differ from what the learner sent."""


def compare_checksums(expected: Mapping[str, str], received: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`WeightVerificationError` naming every tensor that is missing, unexpected or altered."""
    problems = [f"{name}: missing" for name in expected if name not in received]
    problems += [f"{name}: not in the sender's manifest" for name in received if name not in expected]
    problems += [
        f"{name}: checksum {tensor_checksum(t)} != sent {expected[name]}"
        for name, t in received.items()
        if name in expected and tensor_checksum(t) != expected[name]
    ]
    if problems:
        raise WeightVerificationError("weight sync corrupted in transit: " + "; ".join(problems))
