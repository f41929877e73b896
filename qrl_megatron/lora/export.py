"""The trained adapter as a PEFT folder, and the policy it makes as a merged HF model folder.

* :func:`write_peft_adapter` / :func:`load_peft_adapter` -- ``adapter_config.json`` + ``adapter_model.safetensors``
  (bf16), the folder ``peft.PeftModel.from_pretrained`` and ``vllm serve --lora-modules`` load. Names and shapes
  are checked against :func:`~qrl_megatron.lora.adapter.adapter_shapes` exactly: a folder that loads is the adapter.
* :func:`merge_adapter` -- ``W + (alpha / r) * B @ A`` on HF-named weights (fp32 arithmetic, cast back).
* :func:`export_merged` -- a complete bf16 HF model folder of base + adapter. With ``base_format="nvfp4"`` the base
  is the NVFP4 checkpoint the rollout served and the learner trained against, and its weights are the dequantized
  ones (``te_ext.vllm_export.dequantize_checkpoint``): the merged model computes what the learner computed, not
  what the original bf16 weights plus the adapter would.

Every folder is written next to its destination and renamed into place when complete, so a reader never loads
half an adapter or half a model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from qrl_megatron.lora.adapter import (
    DEFAULT_TARGETS,
    MODULE_PATHS,
    NORM_NAMES,
    AdapterSpec,
    adapter_shapes,
    lora_tensor_name,
    norm_shapes,
    peft_adapter_config,
)
from qrl_megatron.models.registry import ModelSpec, load_spec

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BASE_FORMATS",
    "export_merged",
    "load_peft_adapter",
    "merge_adapter",
    "write_peft_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# "bf16": an unquantized HF folder (any float dtype); "nvfp4": te_ext's compressed-tensors NVFP4 folder.
BASE_FORMATS = ("bf16", "nvfp4")
_NVFP4_CT_FORMAT = "nvfp4-pack-quantized"
_NVFP4_SCALES = ("weight_scale", "weight_global_scale")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_TARGET_RE = re.compile(
    r"^model\.layers\.(\d+)\.(" + "|".join(re.escape(p) for p in MODULE_PATHS.values()) + r")\.weight$"
)
_MODULE_OF_PATH = {path: module for module, path in MODULE_PATHS.items()}
_LISTED = 4  # names shown per category in an error; the rest are counted


# --------------------------------------------------------------------------------------------------------------
# Checks


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_LISTED])
    return shown + (f" (+{len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def _check_tensors(got: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """``got`` must hold exactly ``expected``'s names with its shapes: one ValueError naming every difference."""
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    misshaped = [
        f"{n} {tuple(got[n].shape)} (expected {expected[n]})"
        for n in expected
        if n in got and tuple(got[n].shape) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_names(misshaped)}")
    if problems:
        raise ValueError(f"{what} do not match the model: {'; '.join(problems)}")


def _what(adapter: AdapterSpec) -> str:
    return f"adapter tensors (rank {adapter.rank}, targets {','.join(adapter.targets)})"


def _check_adapter(adapter: AdapterSpec) -> None:
    if adapter.rank < 1:
        raise ValueError(f"adapter rank must be a positive integer, got {adapter.rank}")
    unknown = [t for t in adapter.targets if t not in MODULE_PATHS]
    if unknown or not adapter.targets:
        raise ValueError(f"adapter targets {list(adapter.targets)}: choose one or more of {list(MODULE_PATHS)}")


def _check_norms(
    norms: Mapping[str, torch.Tensor] | None, expected: Mapping[str, tuple[int, ...]], adapter: AdapterSpec
) -> None:
    if norms is None:
        if adapter.train_norms:
            raise ValueError("the adapter trained the RMSNorm weights (train_norms=True): pass them as norms=")
        return
    if not adapter.train_norms:
        raise ValueError("norms= were given but the adapter has train_norms=False; drop them or set train_norms")
    _check_tensors(norms, expected, "trained norms")


def _shape(base: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    shape_of = getattr(base, "shape", None)  # CheckpointReader: the header, without reading the tensor
    return tuple(shape_of(name)) if callable(shape_of) else tuple(base[name].shape)


def _base_layers(names: Iterable[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := _LAYER_RE.match(n))})


# --------------------------------------------------------------------------------------------------------------
# Atomic folders


def _partial_dir(out: Path) -> Path:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _replace_dir(partial: Path, out: Path) -> None:
    # The old folder goes only once the new one is complete; a rename cannot replace a non-empty directory.
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The PEFT adapter folder


def write_peft_adapter(
    tensors: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    adapter: AdapterSpec,
    base_model_dir: str | Path,
    spec: ModelSpec | None = None,
) -> Path:
    """Write the PEFT adapter folder ``out_dir`` (replacing an older one) and return it.

    ``tensors``: exactly :func:`adapter_shapes` of the base model (``spec``, else read from ``base_model_dir``),
    stored as bf16; ``adapter_config.json`` names the resolved ``base_model_dir`` as the base model.
    """
    from safetensors.torch import save_file

    _check_adapter(adapter)
    base = Path(base_model_dir).resolve()
    spec = spec if spec is not None else load_spec(base)
    _check_tensors(tensors, adapter_shapes(spec, adapter.rank, adapter.targets), _what(adapter))
    out = Path(out_dir)
    # clone(): safetensors refuses tensors that share storage (slices of one fused buffer)
    weights = {n: tensors[n].detach().to("cpu", torch.bfloat16).contiguous().clone() for n in tensors}
    partial = _partial_dir(out)
    try:
        save_file(weights, str(partial / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = peft_adapter_config(adapter, str(base))
        (partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _replace_dir(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _adapter_from_config(config: Mapping[str, object], path: Path) -> AdapterSpec:
    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: {why}; this is not a LoRA adapter written by qrl_megatron.lora.export")

    if config.get("peft_type") != "LORA":
        raise bad(f"peft_type {config.get('peft_type')!r}, expected 'LORA'")
    # What our layers cannot represent: each changes the computation the PEFT folder stands for.
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, plain) != plain:
            raise bad(f"{key}={config.get(key)!r} is not supported (only {plain!r})")
    for key in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise bad(f"{key}={config.get(key)!r} is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad(f"r={rank!r} must be a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise bad(f"lora_alpha={alpha!r} must be a number")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or any(t not in MODULE_PATHS for t in targets):
        raise bad(f"target_modules={targets!r} must be a list of {list(MODULE_PATHS)}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, int | float):
        raise bad(f"lora_dropout={dropout!r} must be a number")
    # The config stores the targets sorted: give them back in the canonical (layer) order.
    ordered = tuple(m for m in DEFAULT_TARGETS if m in targets)
    return AdapterSpec(rank=rank, alpha=float(alpha), targets=ordered, dropout=float(dropout))


def _structural_shapes(tensors: Mapping[str, torch.Tensor], adapter: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Expected shapes when no model is at hand: every layer up to the last one named, every target, rank ``r``."""
    layers = _base_layers(n.removeprefix("base_model.model.") for n in tensors)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers[-1] + 1 if layers else 0):
        for module in adapter.targets:
            a, b = lora_tensor_name(layer, module, "A"), lora_tensor_name(layer, module, "B")
            a_in = tensors[a].shape[-1] if a in tensors and tensors[a].dim() == 2 else -1
            b_out = tensors[b].shape[0] if b in tensors and tensors[b].dim() == 2 else -1
            shapes[a], shapes[b] = (adapter.rank, a_in), (b_out, adapter.rank)
    return shapes


def load_peft_adapter(
    adapter_dir: str | Path, spec: ModelSpec | None = None
) -> tuple[dict[str, torch.Tensor], AdapterSpec]:
    """Read a folder :func:`write_peft_adapter` wrote: its tensors (as stored, bf16) and its :class:`AdapterSpec`.

    The config must describe a plain LoRA adapter (no DoRA / rsLoRA / rank patterns / saved modules). The tensors
    are checked against ``spec``'s :func:`adapter_shapes` when a spec is given, else for completeness (every layer,
    every target, A and B of rank ``r``). ``train_norms`` is not part of a PEFT folder and reads back False.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; {path} is not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    adapter = _adapter_from_config(config, config_path)
    tensors = load_file(str(weights_path))
    expected = (
        adapter_shapes(spec, adapter.rank, adapter.targets)
        if spec is not None
        else _structural_shapes(tensors, adapter)
    )
    if not expected:
        raise ValueError(f"{weights_path}: holds no LoRA tensors of {list(adapter.targets)}")
    _check_tensors(tensors, expected, f"{weights_path}: the adapter tensors")
    return tensors, adapter


# --------------------------------------------------------------------------------------------------------------
# Merging


def _merged(
    name: str,
    weight: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    adapter: AdapterSpec,
    norms: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, bool]:
    """``name``'s merged value, and whether the adapter (or a trained norm) changed it."""
    if norms is not None and name in norms:
        return norms[name].detach().to("cpu", weight.dtype), True
    m = _TARGET_RE.match(name)
    if m is None or _MODULE_OF_PATH[m.group(2)] not in adapter.targets:
        return weight, False
    layer, module = int(m.group(1)), _MODULE_OF_PATH[m.group(2)]
    a = tensors[lora_tensor_name(layer, module, "A")].detach().to("cpu", torch.float32)
    b = tensors[lora_tensor_name(layer, module, "B")].detach().to("cpu", torch.float32)
    return (weight.to(torch.float32) + adapter.scaling * (b @ a)).to(weight.dtype), True


def merge_adapter(
    base: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    adapter: AdapterSpec,
    norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """HF weights ``base`` with ``W + (alpha / r) * B @ A`` for every target linear (fp32, cast to ``W``'s dtype)
    and the trained ``norms`` substituted; every other tensor is ``base``'s own.

    The adapter's names and shapes are checked against ``base`` (every decoder layer in it, every target).
    """
    _check_adapter(adapter)
    expected: dict[str, tuple[int, ...]] = {}
    missing_base = []
    for layer in _base_layers(base):
        for module in adapter.targets:
            w_name = f"model.layers.{layer}.{MODULE_PATHS[module]}.weight"
            if w_name not in base:
                missing_base.append(w_name)
                continue
            out_features, in_features = _shape(base, w_name)
            expected[lora_tensor_name(layer, module, "A")] = (adapter.rank, in_features)
            expected[lora_tensor_name(layer, module, "B")] = (out_features, adapter.rank)
    if missing_base:
        raise ValueError(f"merge_adapter: the base weights lack the adapter's targets {_names(missing_base)}")
    _check_tensors(tensors, expected, _what(adapter))
    norm_expected = {
        n: _shape(base, n) for n in base if _LAYER_RE.match(n) and n.endswith(tuple(f".{k}.weight" for k in NORM_NAMES))
    }
    _check_norms(norms, norm_expected, adapter)
    return {name: _merged(name, base[name], tensors, adapter, norms)[0] for name in base}


def _nvfp4_dequantized(reader: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF-named fp32 weights of an NVFP4 checkpoint, one linear at a time (never the whole model)."""
    from te_ext.vllm_export import dequantize_checkpoint

    scales = {f"{n[: -len('weight_packed')]}{s}" for n in reader if n.endswith(".weight_packed") for s in _NVFP4_SCALES}
    for name in reader:
        if name in scales:
            continue
        if name.endswith(".weight_packed"):
            module = name[: -len("weight_packed")]
            part = {
                name: reader[name],
                **{module + s: reader[module + s] for s in _NVFP4_SCALES if module + s in reader},
            }
            yield from dequantize_checkpoint(part, "nvfp4").items()
        else:
            t = reader[name]
            yield name, t.to(torch.float32) if t.is_floating_point() else t


def export_merged(
    base_dir: str | Path,
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    adapter: AdapterSpec,
    norms: Mapping[str, torch.Tensor] | None = None,
    *,
    base_format: str = "bf16",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write base + adapter as a complete bf16 HF model folder ``out_dir`` (transformers and vLLM load it).

    ``base_format="bf16"``: ``base_dir`` is an unquantized HF folder. ``"nvfp4"``: ``base_dir`` is an NVFP4
    checkpoint folder (``qrl-export --format nvfp4`` / ``te_ext.vllm_export``), merged from its dequantized
    weights; the folder's config is then a plain one (no ``quantization_config``). Config, generation config and
    tokenizer come from ``base_dir``. Shards of ``max_shard_bytes`` (hf_export's default when None); written to
    ``<out>.partial`` and renamed when complete.
    """
    from qrl_megatron.hf_export import HFFolderWriter
    from qrl_megatron.models.base import load_hf_weights

    if base_format not in BASE_FORMATS:
        raise ValueError(f"base_format must be one of {', '.join(BASE_FORMATS)}, got {base_format!r}")
    _check_adapter(adapter)
    base = Path(base_dir)
    spec = load_spec(base)
    quant = json.loads((base / "config.json").read_text()).get("quantization_config")
    if base_format == "bf16" and quant is not None:
        raise ValueError(
            f"{base} is a quantized checkpoint ({quant.get('format') or quant.get('quant_method')}); pass "
            "base_format='nvfp4' for an NVFP4 folder, or point base_dir at the bf16 model"
        )
    if base_format == "nvfp4" and (quant is None or quant.get("format") != _NVFP4_CT_FORMAT):
        raise ValueError(
            f"{base} is not an NVFP4 checkpoint (config.json has no {_NVFP4_CT_FORMAT!r} quantization_config); "
            "pass base_format='bf16' for an unquantized folder"
        )
    _check_tensors(tensors, adapter_shapes(spec, adapter.rank, adapter.targets), _what(adapter))
    _check_norms(norms, norm_shapes(spec), adapter)

    reader = load_hf_weights(base)
    items: Iterable[tuple[str, torch.Tensor]] = (
        _nvfp4_dequantized(reader) if base_format == "nvfp4" else ((n, reader[n]) for n in reader)
    )
    writer_opts = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    changed = 0
    with HFFolderWriter(out_dir, base, dtype=torch.bfloat16, **writer_opts) as writer:
        for name, weight in items:
            value, hit = _merged(name, weight, tensors, adapter, norms)
            changed += hit
            writer.add(name, value)
        # Every A/B pair and every trained norm must have met its base weight, or the export is not the policy.
        want = len(tensors) // 2 + (len(norms) if norms is not None else 0)
        if changed != want:
            raise ValueError(
                f"{base}: merged {changed} of {want} adapter targets and norms; the folder's weights do not match "
                "its config.json"
            )
        return writer.finish()
