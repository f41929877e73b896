"""Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), in a subprocess.

* vLLM's own Triton kernels, taken from the installed vLLM with ``inspect.getsource`` (vLLM disables Triton on a
  CPU-only machine, so they are re-decorated with the real ``triton.jit`` in the interpreter):
  ``downcast_to_mxfp`` (its MXFP4 quantizer) against ``te_ext.quantize(..., "mxfp4", arith="vllm")`` and
  ``_triton_dequantize_nvfp4`` (its NVFP4 dequantizer) against ``QuantizedTensor.dequantize``.
* te_ext's own kernels (te_ext/triton_kernels.py, untested on a GPU) against te_ext's torch path.

The interpreter's float32 -> float8/bfloat16 conversion is not IEEE-faithful (it rounds half up and drops the carry
into the exponent, e.g. 31.25 -> 16 in E4M3), so the subprocess replaces it with torch's conversion for float8e4nv
and bfloat16; the GPU's ``cvt.rn`` conversions round to nearest even like torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or importlib.util.find_spec("vllm") is None,
        reason="needs Triton (interpreter) and vLLM (the reference kernels)",
    ),
]

SCRIPT = r"""
import os, sys, json, inspect, importlib.util, tempfile
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as _interp

_orig_convert = _interp._convert_float

# triton dtype -> (torch dtype, torch raw integer dtype of the same width, numpy raw dtype)
_TORCH = {
    tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8, np.uint8),
    tl.bfloat16: (torch.bfloat16, torch.int16, np.int16),
}

def _convert_float(data, input_dtype, output_dtype, rounding_mode):
    if input_dtype == tl.float32 and output_dtype in _TORCH:
        tdt, raw, _ = _TORCH[output_dtype]
        t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
        return t.to(tdt).view(raw).numpy().reshape(data.shape)
    if output_dtype == tl.float32 and input_dtype in _TORCH:
        tdt, _, npraw = _TORCH[input_dtype]
        t = torch.from_numpy(np.ascontiguousarray(data).view(npraw).copy()).view(tdt)
        return t.float().numpy().view(np.uint32).reshape(data.shape)
    return _orig_convert(data, input_dtype, output_dtype, rounding_mode)

_interp._convert_float = _convert_float

import te_ext
from vllm.model_executor.layers.quantization.utils import mxfp4_utils, nvfp4_emulation_utils

def load(name, fns):
    src = "import torch\nimport triton\nimport triton.language as tl\n\n"
    src += "\n\n".join(inspect.getsource(f) for f in fns)
    path = os.path.join(tempfile.mkdtemp(), name + ".py")
    with open(path, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

vmx = load("vllm_mxfp4_ref", [mxfp4_utils.permute_shape, mxfp4_utils._compute_quant_and_scale,
                               mxfp4_utils._downcast_to_mxfp, mxfp4_utils.downcast_to_mxfp])
vnv = load("vllm_nvfp4_ref", [nvfp4_emulation_utils._e2m1_inline, nvfp4_emulation_utils._dequantize_nvfp4_kernel,
                               nvfp4_emulation_utils._triton_dequantize_nvfp4])
from te_ext import triton_kernels as tk

res = {}
g = torch.Generator().manual_seed(0)

def eq(a, b):
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(a.shape == b.shape and torch.equal(a, b))

# --- vLLM MXFP4 quantizer
mant = torch.tensor([1.0, 1.49, 1.5, 1.74, 1.75, 1.76, 1.999])
exps = torch.tensor([-20.0, -3.0, 0.0, 5.0])
amaxes = (mant[:, None] * 2.0 ** exps[None, :]).flatten()
edge = torch.zeros(amaxes.numel() + 2, 64)
edge[:-2, 0] = amaxes
edge[:-2, 1:32] = amaxes[:, None] * torch.linspace(-1, 0.97, 31)
edge[:-2, 32:] = torch.randn(amaxes.numel(), 32, generator=g)
edge[-1, :8] = -0.0
for name, x in {
    "random_bf16": (torch.randn(130, 256, generator=g) * torch.rand(130, 1, generator=g) * 5).to(torch.bfloat16),
    "random_fp16": (torch.randn(64, 96, generator=g) * 3).to(torch.float16),
    "edges_bf16": edge.to(torch.bfloat16),
}.items():
    q, s, _ = vmx.downcast_to_mxfp(x, axis=-1)
    ours = te_ext.quantize(x, "mxfp4", arith="vllm")
    res["mxfp4_" + name] = eq(ours.codes, q) and eq(ours.scales["weight_scale"], s)
    ct = te_ext.quantize(x, "mxfp4")
    # compressed-tensors arithmetic differs from vLLM's kernel only in the sign of zero (-0.0 -> code 0 vs 8)
    res["mxfp4_ct_only_signed_zero_differs_" + name] = bool(
        torch.equal(ct.scales["weight_scale"], s)
        and torch.equal(te_ext.mxfp4.dequantize(ct, torch.float32), te_ext.mxfp4.dequantize(ours, torch.float32))
    )

# --- vLLM NVFP4 Triton dequantizer
w = torch.randn(48, 128, generator=g) * torch.rand(48, 1, generator=g) * 4
w[0, :16] = 0
qt = te_ext.quantize(w, "nvfp4")
inv = 1.0 / qt.scales["weight_global_scale"].max()
for dt in (torch.bfloat16, torch.float16, torch.float32):
    ref = vnv._triton_dequantize_nvfp4(qt.codes, qt.scales["weight_scale"], inv.reshape(1), dt, 16)
    res["nvfp4_dequant_" + str(dt).replace("torch.", "")] = eq(qt.dequantize(dt), ref)

# --- te_ext kernels vs te_ext torch path
for name, x in {
    "bf16": (torch.randn(40, 256, generator=g) * torch.rand(40, 1, generator=g) * 3).to(torch.bfloat16),
    "fp32_small": torch.randn(3, 48, generator=g) * 1e-3,
}.items():
    x[0, :16] = 0
    qt = te_ext.quantize(x, "nvfp4")
    q, s = tk.nvfp4_quantize(x, qt.scales["weight_global_scale"])
    res["tk_nvfp4_" + name] = eq(q, qt.codes) and eq(s, qt.scales["weight_scale"])
    for gran in ("tensor", "channel"):
        f = te_ext.quantize(x, "fp8", granularity=gran)
        res[f"tk_fp8_{gran}_{name}"] = eq(tk.fp8_quantize(x, f.scales["weight_scale"]), f.codes)
a = torch.randn(20, 128, generator=g).to(torch.bfloat16)
wq = te_ext.quantize(torch.randn(72, 128, generator=g), "nvfp4")
out = tk.nvfp4_w4a16_matmul(a, wq.codes, wq.scales["weight_scale"], wq.scales["weight_global_scale"])
ref = (a.float() @ wq.dequantize(torch.float32).T).to(torch.bfloat16)
res["tk_w4a16_matmul"] = bool(torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2))
print("RESULTS " + json.dumps(res))
"""


@pytest.fixture(scope="module")
def results():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, f"interpreter run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("case", ["random_bf16", "random_fp16", "edges_bf16"])
def test_mxfp4_matches_vllm_triton_quantizer(results, case):
    assert results["mxfp4_" + case]
    assert results["mxfp4_ct_only_signed_zero_differs_" + case]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_nvfp4_dequant_matches_vllm_triton_dequantizer(results, dtype):
    assert results["nvfp4_dequant_" + dtype]


def test_te_ext_triton_kernels_match_torch_path(results):
    bad = [k for k, v in results.items() if k.startswith("tk_") and not v]
    assert not bad, bad
