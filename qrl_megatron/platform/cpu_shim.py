"""The CPU shim for megatron-core 0.19.2: what lets the Megatron learner run on a CPU-only machine with gloo.

Why it exists: megatron-core calls CUDA unconditionally in a handful of places (``torch.cuda.current_device()``,
CUDA RNG state, tensors created with ``device="cuda"``, ``.cuda()``, ``torch.cuda.synchronize()``,
streams/events, and ``param.type() == 'torch.cuda.FloatTensor'`` checks). No config flag avoids them, and we
want the whole trainer (tests, demos, CI) to run without a GPU. :func:`apply_cpu_shim` patches exactly those
call sites, and :data:`MANIFEST` lists every patched module or callable with the reason it needs patching.

How narrow it is, and why each layer is needed:

* Module-level ``torch`` references: in each megatron module that has such a call site, the module global
  ``torch`` is replaced by a proxy of the real ``torch`` module whose ``cuda`` attribute is a CPU stand-in
  (current device = cpu, synchronize/empty_cache no-ops, null streams/events, CUDA RNG = the CPU default
  generator) and whose tensor factories map a CUDA ``device=`` to the CPU. The real ``torch`` module and every
  other module (ours, vLLM's, torch's own) are untouched.
* Tensor methods (``.cuda()`` and ``.type()``) live on ``torch.Tensor`` and cannot be redirected per module, so
  the few megatron functions that call them are wrapped in :func:`cuda_tensor_compat`. The patch is confined as
  far as Python allows: it is on ``torch.Tensor`` only while at least one wrapped function runs, it takes effect
  only in the thread that entered it (other threads get the real methods even inside that window), and only for
  CPU tensors.
* ``tensor_parallel.random``: the CUDA RNG get/set helpers are replaced by CPU-generator versions.

The call sites were read off megatron-core 0.19.2; another version may have moved, added or removed some, and a
missed one shows up as a CUDA error far from its cause. So :func:`check_megatron_version` refuses other versions
unless ``QRL_ALLOW_MEGATRON_VERSION=1`` is set. The shim does nothing when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOW_VERSION_ENV",
    "MANIFEST",
    "SUPPORTED_MEGATRON_VERSION",
    "apply_cpu_shim",
    "check_megatron_version",
    "cuda_tensor_compat",
    "is_cpu_shim_applied",
]

# The megatron-core release whose CUDA call sites the tables below were read from.
SUPPORTED_MEGATRON_VERSION = "0.19.2"
ALLOW_VERSION_ENV = "QRL_ALLOW_MEGATRON_VERSION"


def check_megatron_version() -> str:
    """Return the installed megatron-core version; raise RuntimeError unless it is the one the shim was written for.

    With ``QRL_ALLOW_MEGATRON_VERSION=1`` a mismatch only logs a warning (to try a new release on purpose).
    """
    try:
        installed = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    if installed == SUPPORTED_MEGATRON_VERSION:
        return installed
    message = (
        f"the megatron-core CPU shim was written for megatron-core {SUPPORTED_MEGATRON_VERSION}, but "
        f"megatron-core {installed} is installed; its CUDA call sites may differ"
    )
    if os.environ.get(ALLOW_VERSION_ENV) == "1":
        logger.warning("%s (%s=1: applying the shim anyway)", message, ALLOW_VERSION_ENV)
        return installed
    raise RuntimeError(f"{message}. Set {ALLOW_VERSION_ENV}=1 to try anyway.")


# ----------------------------------------------------------------------------------------------------------------
# CPU stand-ins for torch.cuda
# ----------------------------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, an int index) to the CPU."""
    if device is None:
        return None
    if isinstance(device, bool):  # bool is an int; never a device spec
        return device
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str):
        return _CPU if device.split(":")[0] == "cuda" else device
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    return device


class _NullEvent:
    """CUDA event stand-in: records wall-clock time so ``elapsed_time`` still means something."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **_: Any):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: _NullEvent) -> float:
        if self._t is None or end_event._t is None:
            return 0.0
        return (end_event._t - self._t) * 1000.0


class _NullStream:
    """CUDA stream stand-in: CPU ops are synchronous, so every wait is a no-op."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any):
        self.device = _CPU
        self.priority = priority

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _NullEvent | None = None) -> _NullEvent:
        event = event if event is not None else _NullEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL_STREAM = _NullStream()


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


class _CpuCuda(types.ModuleType):
    """What megatron modules see as ``torch.cuda`` on a CPU machine.

    Overrides only what megatron calls unconditionally; everything else (``FloatTensor`` type objects,
    ``amp``, ``nvtx``, ``is_available`` ...) is the real ``torch.cuda`` attribute.
    """

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        # "The device" is the CPU: used as ``device=`` argument and in ``.to(...)`` all over megatron.
        self.current_device = lambda: _CPU
        self.set_device = lambda device: None
        # synchronize()/empty_cache(): p2p_communication, parallel_state, DDP, optimizer, dist-checkpointing.
        self.synchronize = lambda device=None: None
        self.empty_cache = lambda: None
        # Streams and events: param_and_grad_buffer.start_grad_sync (current_stream().wait_event),
        # DDP communication stream, pipeline_parallel.utils.set_streams, timers.
        self.current_stream = lambda device=None: _NULL_STREAM
        self.default_stream = lambda device=None: _NULL_STREAM
        self.Stream = _NullStream
        self.Event = _NullEvent
        self.stream = lambda stream=None: contextlib.nullcontext()
        # CUDA RNG -> the CPU default generator (the generator CPU kernels such as dropout actually use):
        # tensor_parallel.random CudaRNGStatesTracker.add / model_parallel_cuda_manual_seed / CheckpointFunction.
        self.manual_seed = _cpu_manual_seed
        self.manual_seed_all = _cpu_manual_seed
        self.get_rng_state = _cpu_get_rng_state
        self.set_rng_state = _cpu_set_rng_state
        self.initial_seed = lambda: torch.default_generator.initial_seed()
        self.default_generators = (torch.default_generator,)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


_CPU_CUDA = _CpuCuda()

# Tensor factories that megatron calls with ``device="cuda"`` / ``device=torch.cuda.current_device()``.
_FACTORIES = (
    "arange",
    "empty",
    "empty_like",
    "empty_strided",
    "eye",
    "full",
    "full_like",
    "linspace",
    "ones",
    "ones_like",
    "rand",
    "randint",
    "randn",
    "tensor",
    "as_tensor",
    "zeros",
    "zeros_like",
)


def _cpu_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _MegatronCpuTorch(types.ModuleType):
    """The ``torch`` global of shimmed megatron modules: the real torch, except ``cuda`` and the factories."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CPU_CUDA
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _MegatronCpuTorch()


# ----------------------------------------------------------------------------------------------------------------
# Scoped Tensor.cuda / Tensor.type compatibility (only while a wrapped megatron function runs, only in its thread)
# ----------------------------------------------------------------------------------------------------------------

# Tensor methods are class attributes, so a per-module proxy cannot reach them. To keep the patch as small as we
# can: it is installed on ``torch.Tensor`` when the first thread enters :func:`cuda_tensor_compat` and removed when
# the last leaves; while installed, the replacements act only for threads inside the context (another thread -- a
# vLLM engine or a checkpoint writer running at the same time -- gets the real method) and only on CPU tensors.
_compat_lock = threading.Lock()
_compat_depth_by_thread: dict[int, int] = {}
# The real methods, captured when the patch is installed; kept after removal so that a thread which looked up the
# replacement just before removal still finds the original.
_saved_tensor_attrs: dict[str, tuple[bool, Any]] = {}


def _in_compat() -> bool:
    return threading.get_ident() in _compat_depth_by_thread


def _original_tensor_attr(name: str) -> Any:
    return _saved_tensor_attrs[name][1]


def _compat_tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _in_compat() and self.device.type == "cpu":
        return self  # the tensor already lives on "the device" (the CPU)
    return _original_tensor_attr("cuda")(self, *args, **kwargs)


def _compat_tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    original = _original_tensor_attr("type")
    if _in_compat() and dtype is None and not kwargs and self.device.type == "cpu":
        # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor', what megatron's optimizer checks compare against.
        return original(self).replace("torch.", "torch.cuda.", 1)
    return original(self, dtype, non_blocking, **kwargs)


_COMPAT_ATTRS = {"cuda": _compat_tensor_cuda, "type": _compat_tensor_type}


@contextlib.contextmanager
def cuda_tensor_compat() -> Iterator[None]:
    """Inside (this thread, reentrant): ``Tensor.cuda`` is the identity on CPU tensors, ``Tensor.type()`` names
    CUDA types. Outside, and in every other thread, both are the real methods."""
    ident = threading.get_ident()
    with _compat_lock:
        if not _compat_depth_by_thread:
            for name, replacement in _COMPAT_ATTRS.items():
                had_own = name in torch.Tensor.__dict__
                _saved_tensor_attrs[name] = (had_own, getattr(torch.Tensor, name))
                setattr(torch.Tensor, name, replacement)
        _compat_depth_by_thread[ident] = _compat_depth_by_thread.get(ident, 0) + 1
    try:
        yield
    finally:
        with _compat_lock:
            depth = _compat_depth_by_thread.pop(ident) - 1
            if depth:
                _compat_depth_by_thread[ident] = depth
            elif not _compat_depth_by_thread:
                for name, (had_own, original) in _saved_tensor_attrs.items():
                    if had_own:
                        setattr(torch.Tensor, name, original)
                    else:
                        delattr(torch.Tensor, name)


def _with_compat(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_tensor_compat():
            return fn(*args, **kwargs)

    wrapper.__qrl_cpu_shim__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_method(cls: type, name: str) -> None:
    raw = cls.__dict__[name]
    if isinstance(raw, classmethod):
        setattr(cls, name, classmethod(_with_compat(raw.__func__)))
    elif isinstance(raw, staticmethod):
        setattr(cls, name, staticmethod(_with_compat(raw.__func__)))
    else:
        setattr(cls, name, _with_compat(raw))


def _replace_everywhere(original: Any, replacement: Any) -> None:
    """Rebind every ``megatron.core`` module global that refers to ``original`` (``from x import f`` copies)."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron.core"):
            continue
        mod_dict = getattr(mod, "__dict__", None)
        if not mod_dict:
            continue
        for attr, value in list(mod_dict.items()):
            if value is original:
                mod_dict[attr] = replacement


def _wrap_function(module: types.ModuleType, name: str) -> None:
    original = getattr(module, name)
    _replace_everywhere(original, _with_compat(original))


# ----------------------------------------------------------------------------------------------------------------
# The shim
# ----------------------------------------------------------------------------------------------------------------

# megatron.core modules whose global ``torch`` becomes the CPU proxy, and the call sites that need it.
_PROXIED_MODULES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device(); MultimodalRotaryEmbedding init"
    ),
    "megatron.core.models.gpt.gpt_model": "inference sequence_len_offset on torch.cuda.current_device()",
    "megatron.core.models.common.utils": "torch.cuda.stream contexts",
    "megatron.core.transformer.utils": "get_default_causal_mask: torch.ones(..., device='cuda') (unfused softmax)",
    "megatron.core.transformer.attention": "KV-cache / buffers on torch.cuda.current_device()",
    "megatron.core.transformer.dot_product_attention": "softmax_offset on torch.cuda.current_device()",
    "megatron.core.transformer.transformer_layer": "static inputs / events on torch.cuda.current_device()",
    "megatron.core.transformer.module": "static inputs on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.random": "CudaRNGStatesTracker: torch.cuda.get_rng_state/manual_seed",
    "megatron.core.tensor_parallel.layers": "GPU init / gather buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "all-gather / reduce-scatter buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.utils": "gather_split_1d_tensor buffer on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.data": "broadcast_data: torch.tensor(..., device='cuda')",
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens = torch.zeros(..., device='cuda') (3 places)",
    "megatron.core.pipeline_parallel.p2p_communication": "shape/recv buffers on current_device(), synchronize()",
    "megatron.core.pipeline_parallel.utils": "communication streams (torch.cuda.Stream/current_stream)",
    "megatron.core.distributed.param_and_grad_buffer": (
        "buffers on current_device(); start_grad_sync current_stream().wait_event / stream contexts"
    ),
    "megatron.core.distributed.distributed_data_parallel": "communication Stream, synchronize/empty_cache",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors with device='cuda', empty_cache",
    "megatron.core.optimizer.clip_grads": "grad-norm tensors with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "gather buffers on torch.cuda.current_device()",
    "megatron.core.optimizer.grad_scaler": "scale tensors with device='cuda'",
    "megatron.core.utils": "param-hash / norm tensors with device='cuda', timers' events",
    "megatron.core.parallel_state": "torch.cuda.synchronize() in update_pg_timeout",
    "megatron.core.dist_checkpointing.exchange_utils": "torch.empty_like(..., device='cuda') exchange buffers",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize() before writes",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize() around exchanges",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "verification flags with device='cuda'",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness tensors / synchronize()",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "torch.cuda.synchronize()",
}

# (module, class or None, attribute): functions that call ``Tensor.cuda()`` or compare ``Tensor.type()`` with
# CUDA type names; they run inside :func:`cuda_tensor_compat`.
_COMPAT_CALLABLES: tuple[tuple[str, str | None, str, str], ...] = (
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule",
        "setup_embeddings_and_output_layer",
        "weight.data.cuda() before the embedding-group all-reduce (tied embeddings with PP > 1)",
    ),
    (
        "megatron.core.models.common.embeddings.rope_utils",
        None,
        "get_pos_emb_on_this_cp_rank",
        "index tensor .cuda() (context parallel)",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params",
        "__init__",
        "param.type() in ['torch.cuda.HalfTensor', ...] / == 'torch.cuda.FloatTensor'",
    ),
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer", "restore_from_cpu", "p.data.cuda()"),
    (
        "megatron.core.optimizer.clip_grads",
        None,
        "clip_grad_by_total_norm_fp32",
        "assert param.grad.type() == 'torch.cuda.FloatTensor'",
    ),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__", "param.type() checks"),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        "_build_model_and_main_param_groups",
        "model_param.type() checks",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        "get_parameter_state_dp_zero",
        "send_tensor.cuda()",
    ),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler", "load_state_dict", "state_dict['scale'].cuda()"),
    ("megatron.core.tensor_parallel.data", None, "broadcast_data", "data[key].cuda()"),
    ("megatron.core.utils", None, "check_param_hashes_across_dp_replicas", "torch.stack(hashes).cuda()"),
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        None,
        "exchange_loaded_tensors_gather_rounds",
        "loaded tensor .cuda()",
    ),
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        None,
        "exchange_loaded_tensors_broadcast",
        "loaded tensor .cuda()",
    ),
)


# ``megatron.core.tensor_parallel.random`` helpers replaced outright (every ``from ... import`` copy inside
# megatron.core is rebound too). CudaRNGStatesTracker and model_parallel_cuda_manual_seed reach the CUDA generator
# only through them, so replacing them moves megatron's "CUDA" RNG onto the CPU default generator -- the generator
# CPU kernels such as dropout actually draw from.
_RNG_MODULE = "megatron.core.tensor_parallel.random"
_RNG_FUNCTIONS: dict[str, str] = {
    "_get_cuda_rng_state": "indexes torch.cuda.default_generators; returns the CPU generator state instead",
    "_set_cuda_rng_state": "sets the state through torch.cuda._lazy_call; sets the CPU generator state instead",
}


def _cpu_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise RuntimeError("cudagraph-safe RNG (use_cudagraphable_rng) needs CUDA")
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise RuntimeError("cudagraph-safe RNG (use_cudagraphable_rng) needs CUDA")
    torch.set_rng_state(new_state)


_RNG_REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "_get_cuda_rng_state": _cpu_get_cuda_rng_state,
    "_set_cuda_rng_state": _cpu_set_cuda_rng_state,
}


def _callable_key(module: str, cls_name: str | None, attr: str) -> str:
    return f"{module}:{cls_name}.{attr}" if cls_name else f"{module}:{attr}"


# Everything the shim patches, and why: ``"megatron.core.x"`` is a module whose ``torch`` global becomes the CPU
# proxy; ``"megatron.core.x:Class.method"`` / ``"megatron.core.x:function"`` is a callable that is wrapped in
# cuda_tensor_compat or (tensor_parallel.random) replaced. One table, so a megatron upgrade can be reviewed entry
# by entry against the new release's source.
MANIFEST: dict[str, str] = {
    **_PROXIED_MODULES,
    **{_callable_key(mod, cls, attr): why for mod, cls, attr, why in _COMPAT_CALLABLES},
    **{_callable_key(_RNG_MODULE, None, name): why for name, why in _RNG_FUNCTIONS.items()},
}


def _drop_cpu_rng_fork_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() != "CPU RNG state changed within GPU RNG context"


_shim_lock = threading.Lock()
_shim_applied = False


def is_cpu_shim_applied() -> bool:
    return _shim_applied


def _import_optional(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # a module we would patch but that does not import here: nothing to patch
        logger.debug("cpu shim: skipping %s (%s)", name, exc)
        return None


def apply_cpu_shim() -> None:
    """Make megatron-core run on CPU with gloo. Idempotent, process-wide; a no-op when CUDA is available.

    Raises RuntimeError (see :func:`check_megatron_version`) for a megatron-core other than 0.19.2.
    """
    global _shim_applied
    # torch directly rather than distributed.is_cuda_available: distributed imports this module.
    if _shim_applied or torch.cuda.is_available():
        return
    with _shim_lock:
        if _shim_applied:
            return
        check_megatron_version()
        # 1. Module-level ``torch`` -> CPU proxy (torch.cuda.*, device="cuda" factories).
        for mod_name in _PROXIED_MODULES:
            mod = _import_optional(mod_name)
            if mod is not None and getattr(mod, "torch", None) is torch:
                mod.torch = _CPU_TORCH  # type: ignore[attr-defined]

        # 2. tensor_parallel.random: the CUDA RNG state helpers -> CPU-generator versions.
        random_mod = importlib.import_module(_RNG_MODULE)
        for name, replacement in _RNG_REPLACEMENTS.items():
            _replace_everywhere(getattr(random_mod, name), replacement)

        # CudaRNGStatesTracker.fork warns when the CPU RNG state changes inside a fork (e.g. dropout). On CPU
        # the forked "CUDA" state *is* the CPU generator, so every dropout in a fork would trigger it.
        logging.getLogger(random_mod.__name__).addFilter(_drop_cpu_rng_fork_warning)

        # 3. Functions calling Tensor.cuda() / comparing Tensor.type() with CUDA type names.
        for mod_name, cls_name, attr, _why in _COMPAT_CALLABLES:
            mod = _import_optional(mod_name)
            if mod is None:
                continue
            if cls_name is None:
                if not getattr(getattr(mod, attr), "__qrl_cpu_shim__", False):
                    _wrap_function(mod, attr)
            else:
                _wrap_method(getattr(mod, cls_name), attr)
        _shim_applied = True
        logger.info("megatron-core CPU shim applied (%d patches, see MANIFEST)", len(MANIFEST))
