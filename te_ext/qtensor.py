"""The container every te_ext quantizer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Checkpoint (safetensors) names vLLM loads, per format. ``codes`` is stored under the first name.
_CODE_NAME = {"nvfp4": "weight_packed", "mxfp4": "weight_packed", "fp8": "weight", "int8": "weight"}


@dataclass
class QuantizedTensor:
    """A quantized tensor: integer/low-precision ``codes`` plus the ``scales`` needed to decode them.

    Attributes:
        fmt: "nvfp4", "mxfp4", "fp8" or "int8".
        codes: nvfp4/mxfp4: uint8 ``[..., K/2]`` (two E2M1 codes per byte, low nibble first); fp8:
            float8_e4m3fn of the input shape; int8: int8 of the input shape. With ``pad=True`` the fp4 codes
            cover the zero-padded K.
        scales: named scale tensors, named as in the checkpoints vLLM loads:
            nvfp4: ``weight_scale`` (float8_e4m3fn ``[..., K/16]``), ``weight_global_scale`` (float32 ``[1]``,
            the *divisor* convention of compressed-tensors: dequant = code * weight_scale / weight_global_scale);
            mxfp4: ``weight_scale`` (uint8 E8M0 biased exponents ``[..., K/32]``);
            fp8: ``weight_scale`` (float32; ``[1]`` per tensor, ``[rows, 1]`` per channel,
            ``[ceil(rows/bn), ceil(K/bk)]`` per block); int8: ``weight_scale`` (float32 ``[rows, 1]`` or ``[1]``);
            per-token activations (``quantize_activation_per_token``): ``input_scale`` (float32 ``[..., 1]``).
        shape: logical shape of the original tensor.
        options: the options it was quantized with (granularity, arith, seeds, ...).
    """

    fmt: str
    codes: torch.Tensor
    scales: dict[str, torch.Tensor]
    shape: torch.Size
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def per_token(cls, fmt: str, codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> QuantizedTensor:
        """A dynamically quantized activation: one scale per token (row), stored as vLLM's `input_scale`."""
        return cls(
            fmt=fmt,
            codes=codes.reshape(shape),
            scales={"input_scale": scale.reshape(*shape[:-1], 1)},
            shape=torch.Size(shape),
            options={"granularity": "token", "arith": "vllm"},
        )

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, *, reference: str = "vllm") -> torch.Tensor:
        """Decode to ``dtype`` with the logical ``shape``.

        ``reference`` only matters for NVFP4, where the two references multiply the scales in a different order:
        ``"vllm"`` (default) reproduces what the vLLM engine computes from the loaded checkpoint
        (``dequantize_to_dtype``: ``code * (weight_scale * (1 / weight_global_scale))``), ``"compressed_tensors"``
        reproduces the compressed-tensors decompressor (``code * (weight_scale / weight_global_scale)``).
        """
        from te_ext import fp8, int8, mxfp4, nvfp4

        if self.fmt == "nvfp4":
            return nvfp4.dequantize(self, dtype, reference=reference)
        if self.fmt == "mxfp4":
            return mxfp4.dequantize(self, dtype)
        if self.fmt == "fp8":
            return fp8.dequantize(self, dtype)
        if self.fmt == "int8":
            return int8.dequantize(self, dtype)
        raise ValueError(f"unknown format {self.fmt!r}")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the codes plus every scale tensor (NVFP4's one float32 global scale included: 4 bytes)."""
        total = self.codes.numel() * self.codes.element_size()
        for s in self.scales.values():
            total += s.numel() * s.element_size()
        return total

    @property
    def bits_per_element(self) -> float:
        return self.nbytes * 8 / max(self.numel, 1)

    def state_dict(self, prefix: str = "", *, naming: str = "compressed_tensors") -> dict[str, torch.Tensor]:
        """Tensors under the names a vLLM checkpoint uses (``prefix`` e.g. ``"model.layers.0.mlp.down_proj."``).

        ``naming="fp8"`` renames the FP8 *block* scale ``weight_scale`` to ``weight_scale_inv``, the name vLLM's
        ``Fp8LinearMethod`` (``quantization="fp8"`` with ``weight_block_size``, DeepSeek-V3 style checkpoints)
        registers. Despite "_inv" it holds the same value: the dequantization multiplier amax/448.
        """
        if naming not in ("compressed_tensors", "fp8"):
            raise ValueError(f"naming must be 'compressed_tensors' or 'fp8', got {naming!r}")
        out = {prefix + _CODE_NAME[self.fmt]: self.codes}
        for name, t in self.scales.items():
            if naming == "fp8" and self.fmt == "fp8" and self.options.get("granularity") == "block":
                name = name.replace("weight_scale", "weight_scale_inv")
            out[prefix + name] = t
        return out

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(
            self.fmt,
            self.codes.to(device),
            {k: v.to(device) for k, v in self.scales.items()},
            self.shape,
            dict(self.options),
        )

    def __repr__(self) -> str:
        scales = ", ".join(
            f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in self.scales.items()
        )
        return (
            f"QuantizedTensor(fmt={self.fmt!r}, shape={tuple(self.shape)}, codes={tuple(self.codes.shape)} "
            f"{str(self.codes.dtype).replace('torch.', '')}, scales={{{scales}}}, "
            f"bits/elem={self.bits_per_element:.4f})"
        )
