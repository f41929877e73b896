"""Random Hadamard transform (RHT) over blocks of 16 along the last dimension.

``T = diag(d) @ H16 / 4`` with ``H16`` the Sylvester Hadamard matrix and ``d`` a seeded random +-1 vector. T is
orthogonal, so each 16-block keeps its L2 norm while outliers are spread over the block before NVFP4 quantization
(the NVFP4 training recipe applies the same kind of 16x16 transform). ``forward`` maps x to ``x @ T`` block by
block; ``inverse`` maps back with ``T^T = H16 diag(d) / 4``. Both run in float32.
"""

from __future__ import annotations

import functools

import torch

HADAMARD_BLOCK = 16


@functools.lru_cache(maxsize=4)
def sylvester(n: int = HADAMARD_BLOCK) -> torch.Tensor:
    """Unnormalized +-1 Sylvester Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


def random_signs(seed: int, n: int = HADAMARD_BLOCK) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).float().mul_(2.0).sub_(1.0)


def matrix(seed: int, n: int = HADAMARD_BLOCK) -> torch.Tensor:
    """The orthogonal transform ``T = diag(d) H / sqrt(n)`` (float32, n x n)."""
    return random_signs(seed, n)[:, None] * sylvester(n) / (n**0.5)


def forward(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Blockwise ``x @ T`` over the last dim (multiple of 16); returns float32."""
    k = x.shape[-1]
    if k % HADAMARD_BLOCK:
        raise ValueError(f"Hadamard transform needs the last dim to be a multiple of {HADAMARD_BLOCK}, got {k}")
    t = matrix(seed).to(x.device)
    xb = x.float().reshape(-1, HADAMARD_BLOCK)
    return (xb @ t).reshape(x.shape)


def inverse(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Blockwise ``y @ T^T`` (undoes ``forward``); returns float32."""
    t = matrix(seed).to(y.device)
    yb = y.float().reshape(-1, HADAMARD_BLOCK)
    return (yb @ t.T).reshape(y.shape)
