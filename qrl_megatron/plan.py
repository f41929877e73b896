"""`qrl-plan CONFIG [key=value ...] [--json]`: what every GPU of a run holds, and whether it fits ``gpu.memory_gb``.

The plan is computed in ONE process, before any learner process or engine starts and without reading a weight:

* **Parameters** come from the model built on the ``meta`` device (:func:`parameter_entries`: megatron's GPTModel at
  TP1 x PP1, with the LoRA adapters and the frozen NVFP4 base attached by the learner's own code), never from a
  formula. Megatron cannot build a TP>1 stage in one process (its linears read the tensor-parallel group), so each
  tensor's per-rank size is derived with the rules the sharded build follows:

  - split over TP (``/ tp``): the embedding and ``output_layer`` (vocabulary), ``linear_qkv`` weight *and bias*,
    ``linear_fc1`` (columns), ``linear_proj`` / ``linear_fc2`` weights (rows); the frozen NVFP4 codes and block
    scales of each linear (the rank's slice of its checkpoint); LoRA ``B`` of column-parallel linears (qkv, fc1) and
    LoRA ``A`` of row-parallel ones (o, down), as ``qrl_megatron.lora.layers`` slices them;
  - replicated on every TP rank: every RMSNorm weight, biases of row-parallel linears, the NVFP4 per-tensor global
    scales, LoRA ``A`` of column-parallel and LoRA ``B`` of row-parallel linears.

  Pipeline stages get their decoder layers (even split), the first stage the embedding, the last the final norm and
  ``output_layer`` -- with tied embeddings and PP > 1 a copy of the embedding, as megatron keeps it. The largest
  stage is what a GPU must hold, so it is the one reported. At TP1 x PP1 the result equals the bytes a live learner
  allocates (tests/test_plan.py checks it on the tiny model; bench/memory_bench.py on a 0.5B-shaped model too).
* **Gradients and optimizer**: megatron DDP keeps an fp32 gradient per trainable parameter
  (``grad_reduce_in_fp32``); Adam two fp32 moments and, for bf16 parameters, an fp32 master copy, sharded over DP
  with ``learner.distributed_optimizer`` (the gradient buffer is not).
* **Activations**: what autograd saves over one micro-batch forward, term by term for megatron's layer
  (:func:`layer_activation_bytes`), exact on the CPU local spec (unfused attention keeps the ``[b, heads, s, s]``
  probabilities in fp32 and bf16); the TE spec (``gpu.layer_spec``, a GPU without LoRA) keeps no ``s x s`` term. With
  PP, 1F1B keeps ``min(pp - stage, micro-batches)`` micro-batches in flight on a stage.
* **Engine**: its weights in the rollout format at ``rollout.tp`` (linears per ``te_ext.formats`` checkpoint
  layout, the rest bf16), the KV cache vLLM really allocates, its profile-run activations, CUDA graphs.

See docs/memory.md for how to read the table and each rule.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, doc

__all__ = [
    "GPUConfig",
    "Plan",
    "check_plan",
    "layer_activation_bytes",
    "saved_activation_bytes",
    "main",
    "make_plan",
    "parameter_entries",
]

GB = 1e9
HF_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hf_configs"

# --- the allowance: memory that no tensor of ours accounts for -------------------------------------------------
# A CUDA context with lazy module loading is ~0.5 GB on an H100; cuBLAS/cuDNN workspaces and NCCL's communicator
# buffers (a few per group, 4 MB x channels each) add ~0.3-0.5 GB per process: 1 GB per process on the GPU.
CUDA_CONTEXT_BYTES = 1.0 * GB
# vLLM's CUDA graphs (capture sizes up to 512 sequences): vLLM logs 0.5-1.5 GiB "graph memory" for 7B-72B models.
CUDA_GRAPHS_BYTES = 1.0 * GB
# PyTorch's caching allocator rounds blocks and cannot always reuse freed ones: 5% of the tensors' bytes.
FRAGMENTATION = 0.05
# vLLM's offline (LLM class) scheduler defaults on >= 70 GiB GPUs (vllm/engine/arg_utils.py), else the small ones
VLLM_BATCHED_TOKENS = {True: 16384, False: 8192}
VLLM_MAX_SEQS = {True: 1024, False: 256}
QERL_FIX = "learner.lora.rank=32 learner.base_format=nvfp4 rollout.quant=nvfp4 (QeRL mode)"


@dataclass
class GPUConfig:
    """The accelerator the plan is checked against (`gpu.*`)."""

    memory_gb: float = doc(80.0, "memory of one GPU in GB (1e9 bytes); qrl-plan/qrl-train check every GPU against it")
    per_node: int = doc(8, "GPUs per node (TP and the engine's TP stay inside a node)")
    prompt_tokens: int = doc(
        512, "prompt length the plan assumes when task.max_prompt_tokens is 0 (sequence = prompt + max_new_tokens)"
    )
    layer_spec: str = doc(
        "auto",
        "layer implementation the plan assumes: te (Transformer Engine: fused norms, flash attention), local "
        "(megatron's local spec: unfused attention), auto (te, but local with LoRA, whose learner always uses it)",
    )
    check: bool = doc(True, "qrl-train refuses to start a run whose plan does not fit gpu.memory_gb")

    def validate(self, prefix: str = "gpu") -> None:
        check_positive(f"{prefix}.memory_gb", self.memory_gb)
        check_positive(f"{prefix}.per_node", self.per_node)
        check_positive(f"{prefix}.prompt_tokens", self.prompt_tokens)
        check_choice(f"{prefix}.layer_spec", self.layer_spec, ("auto", "te", "local"))


# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor of the TP1 x PP1 meta build: what it is, its bytes and how it divides over TP."""

    name: str
    kind: str  # base_weights | adapter | trained_norms | full_parameters
    nbytes: int
    numel: int
    trainable: bool
    tp_split: bool
    layer: int | None  # global decoder layer, None for embedding / final norm / output layer


@contextmanager
def megatron_warnings_quiet() -> Iterator[None]:
    """The meta build imports megatron-core, which warns that TE/Apex are missing (a CPU fallback the plan does not
    use), that full-scope CUDA graphs and GPTModel are deprecated; the planner's output is its table or its verdict."""
    import logging

    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    level = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
            yield
    finally:
        gpt_logger.setLevel(level)


@contextmanager
def one_rank_parallel_state() -> Iterator[Any]:
    """Megatron's parallel state at TP1 x PP1 in this process (reused when it already exists at TP1 x PP1)."""
    import torch.distributed as dist

    from qrl_megatron.platform import destroy_distributed, init_distributed

    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            if (
                parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1
            ):
                raise RuntimeError("the plan needs a TP1 x PP1 parallel state; call it before init_distributed(tp>1)")
            yield init_distributed(1, 1, dist.get_world_size(), seed=0)
            return
    layout = init_distributed(1, 1, 1, seed=0)
    try:
        yield layout
    finally:
        destroy_distributed()


def _layer_of(name: str) -> int | None:
    from qrl_megatron.models.hf_mapping import megatron_layer_index

    return megatron_layer_index(name)[0]


def parameter_entries(spec: Any, learner: Any, layout: Any) -> list[Entry]:
    """Every parameter and frozen-base buffer of the whole model as the learner builds it, on the meta device.

    ``layout``: a TP1 x PP1 layout (:func:`one_rank_parallel_state`). Uses
    :func:`qrl_megatron.learner.memory.build_meta_stage`, the same construction that ``planned_learner_memory``
    counts (a test checks both against a live learner)."""
    from qrl_megatron.learner.memory import build_meta_stage
    from qrl_megatron.lora.layers import LoRALinear
    from qrl_megatron.models.hf_mapping import tp_split_kind

    module = build_meta_stage(spec, layout, learner)
    lora_ids: set[int] = set()
    entries: list[Entry] = []
    has_lora = False
    for mname, m in module.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        has_lora = True
        layer = _layer_of(mname)
        for pname, p in m.named_parameters(recurse=False):
            lora_ids.add(id(p))
            # column-parallel (qkv, fc1): A whole, B split by output rows; row-parallel (o, down): A split, B whole
            split = pname.startswith("B_") != (m.split == "row")
            entries.append(
                Entry(f"{mname}.{pname}", "adapter", p.numel() * p.element_size(), p.numel(), True, split, layer)
            )
        for bname, b in m.named_buffers(recurse=False):
            if not bname.startswith("base_"):
                continue
            split = not bname.startswith("base_global_scale")  # codes/scales sliced with the weight; global: whole
            entries.append(
                Entry(f"{mname}.{bname}", "base_weights", b.numel() * b.element_size(), b.numel(), False, split, layer)
            )
    for name, p in module.named_parameters():
        if id(p) in lora_ids:
            continue
        if not p.requires_grad:
            kind = "base_weights"
        elif has_lora:
            kind = "trained_norms"
        else:
            kind = "full_parameters"
        split = tp_split_kind(name) != "replicated"
        entries.append(
            Entry(name, kind, p.numel() * p.element_size(), p.numel(), p.requires_grad, split, _layer_of(name))
        )
    return entries


def stage_entries(entries: list[Entry], spec: Any, pp: int, stage: int) -> list[Entry]:
    """The entries pipeline stage ``stage`` of ``pp`` holds (the tied-embedding copy on the last stage included)."""
    per_stage = spec.num_layers // pp
    out = []
    for e in entries:
        if e.layer is not None:
            if stage * per_stage <= e.layer < (stage + 1) * per_stage:
                out.append(e)
        elif e.name.startswith("embedding."):
            if stage == 0:
                out.append(e)
            if stage == pp - 1 and pp > 1 and spec.tie_word_embeddings:
                out.append(replace(e, name="output_layer.weight (tied copy)"))
        elif stage == pp - 1:  # final norm, output layer
            out.append(e)
    return out


def stage_memory(entries: list[Entry], tp: int, dp: int, learner: Any) -> dict[str, int]:
    """Per-rank bytes of one stage's entries: weights by kind, fp32 gradients, Adam state."""
    out = dict.fromkeys(("base_weights", "adapter", "trained_norms", "full_parameters"), 0)
    trainable = 0
    for e in entries:
        div = tp if e.tp_split else 1
        out[e.kind] += e.nbytes // div
        if e.trainable:
            trainable += e.numel // div
    bf16 = learner.precision == "bf16"
    out["gradients"] = trainable * 4
    shard = dp if learner.distributed_optimizer else 1
    out["optimizer_state"] = -(-trainable * (8 + (4 if bf16 else 0)) // shard)
    return out


# ---------------------------------------------------------------------------------------------------------------
def layer_activation_bytes(
    spec: Any, sequences: int, seq: int, tp: int, elem: int, layer_spec: str, recompute: str
) -> tuple[int, int]:
    """(saved bytes of one decoder layer over one micro-batch, extra transient bytes of its backward).

    ``layer_spec="local"`` (megatron's local spec: the CPU path, and every LoRA learner), per token, measured term by
    term with ``saved_tensors_hooks``: each of the two torch RMSNorms saves its input upcast to fp32, the fp32
    normalised value, the fp32 rstd and its output in the compute dtype (the next linear's input); the unfused
    attention saves q, k and v (k and v repeated to every query head) and its output, the fp32 softmax
    probabilities and their cast to the compute dtype (``heads x s`` per token); SwiGLU saves fc1's output (2 f),
    silu's input, its output and the product (3 f); per layer RoPE's cos/sin (``s x head_dim``, 4 tensors) and the
    causal mask (``s x s`` bools). ``"te"`` (Transformer Engine: RMSNorm fused into the next linear, flash
    attention): each norm saves its input, rstd and its output in the compute dtype; attention q, k, v at their own
    heads, the output and the fp32 log-sum-exp; no ``s x s`` term; SwiGLU as above (megatron's torch GLU).
    Split over TP: heads, groups and f; replicated: the hidden size.
    ``full`` recompute keeps only the layer's input and re-runs one layer in the backward (the transient);
    ``selective`` re-runs core attention, so its ``s x s`` probabilities are transient for one layer only (with TE's
    flash attention there are none: selective saves nothing over none).
    """
    h, d, f = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    heads, groups = spec.num_attention_heads // tp, max(1, spec.num_query_groups // tp)
    tokens = sequences * seq
    if layer_spec == "local":
        norm = (3 * 4 * h if elem == 4 else 8 * h + elem * h) + 4  # fp32 input (a no-op copy in fp32), x*rstd, out
        attn = 4 * heads * d * elem  # q, k and v repeated to every head, attention output
        probs_per_token = heads * seq * (4 + (elem if elem != 4 else 0))
        mask = seq * seq
    else:
        norm = 2 * h * elem + 4
        attn = (2 * heads + 2 * groups) * d * elem + heads * 4
        probs_per_token = 0
        mask = 0
    mlp = 5 * (f // tp) * elem
    rope = 4 * seq * d * elem
    dense = tokens * (2 * norm + attn + mlp) + rope + mask
    probs = tokens * probs_per_token
    if recompute == "full":
        return tokens * h * elem, dense + probs
    if recompute == "selective":
        return dense, probs
    return dense + probs, 0


def logits_bytes(tokens: int, vocab: int, tp: int, elem: int, chunk: int) -> int:
    """The last stage's logits and the fp32 log-softmax buffers of the logprob/entropy pass and its backward.

    The lm_head output ``[tokens, vocab/TP]`` in the compute dtype and its gradient; unchunked, the gathered
    ``[tokens, vocab]`` fp32 upcast and log-softmax are saved (measured: 8 bytes per token and vocabulary entry)
    and the backward adds their two fp32 gradients; ``learner.logprob_chunk_tokens`` bounds the four fp32 buffers
    to one chunk's rows."""
    rows = min(chunk, tokens) if chunk > 0 else tokens
    return 2 * tokens * (vocab // tp) * elem + 4 * rows * vocab * 4


def saved_activation_bytes(
    spec: Any, learner: Any, sequences: int, seq: int, layer_spec: str = "local", last_stage: bool = True
) -> int:
    """What autograd saves over one micro-batch forward of a TP1 x PP1 stage with all ``spec.num_layers`` layers:
    the figure ``qrl_megatron.learner.activations.measure_saved_activation_bytes`` measures (the planner's
    activation rule, checked against it). The last stage adds the final norm and the logprob pass's saves: the
    logits and labels when chunked, else the fp32 upcast and log-softmax of ``[tokens, vocab]`` (8 bytes each)."""
    elem = 2 if learner.precision == "bf16" else 4
    recompute = getattr(learner, "recompute", "none")
    saved, _ = layer_activation_bytes(spec, sequences, seq, 1, elem, layer_spec, recompute)
    total = spec.num_layers * saved
    if last_stage:
        tokens = sequences * seq
        h = spec.hidden_size
        total += tokens * (
            (3 * 4 * h if elem == 4 else 8 * h + elem * h) + 4 if layer_spec == "local" else 2 * h * elem + 4
        )
        chunk = getattr(learner, "logprob_chunk_tokens", 0)
        total += tokens * spec.vocab_size * elem + tokens * 8 if chunk else tokens * spec.vocab_size * 8 + tokens * 8
    return total


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Per-GPU items in bytes; ``items`` keeps the table's order. ``counted``: the names that add up to the peak."""

    config: str
    memory_gb: float
    items: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    counted: list[str] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    layout: str = ""

    def add(self, name: str, nbytes: float, note: str = "", counted: bool = True) -> None:
        self.items[name] = int(nbytes)
        if note:
            self.notes[name] = note
        if counted:
            self.counted.append(name)

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory_gb * GB

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        rows = [(k, self.items[k]) for k in self.counted if not k.endswith("total")]
        return sorted(rows, key=lambda kv: -kv[1])[:n]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config,
            "layout": self.layout,
            "fits": self.fits,
            "peak_gb": self.peak / GB,
            "memory_gb": self.memory_gb,
            "phases_gb": {k: v / GB for k, v in self.phases.items()},
            "items": {k: v / GB for k, v in self.items.items()},
            "counted": list(self.counted),
            "notes": dict(self.notes),
        }
        for group in ("learner", "engine"):
            out[group] = {
                f"{k.split('.', 1)[1]}_gb": v / GB for k, v in self.items.items() if k.startswith(group + ".")
            }
        return out

    def table(self) -> str:
        lines = [f"plan for {self.config}: {self.layout}", f"  {'item (per GPU)':<38} {'GB':>9}  note"]
        for k, v in self.items.items():
            mark = " " if k in self.counted else "~"
            lines.append(f" {mark}{k:<38} {v / GB:9.3f}  {self.notes.get(k, '')}".rstrip())
        for k, v in self.phases.items():
            lines.append(f"  {'phase: ' + k:<38} {v / GB:9.3f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  peak per GPU {self.peak / GB:.2f} GB of gpu.memory_gb={self.memory_gb:g}: {verdict}")
        lines.append("  (~ = shown, not counted in the peak)")
        return "\n".join(lines)


def model_spec(cfg: Any) -> Any:
    """The recipe's model shape without reading weights: the tiny shape, a local folder's config.json, the
    published config.json stored in configs/hf_configs, else the model's snapshot in the HF cache."""
    from qrl_megatron.models.registry import load_spec, spec_from_hf_config

    source = cfg.model.source
    if source == "tiny":
        from qrl_megatron.models.tiny import _hf_config

        return spec_from_hf_config(_hf_config(cfg.model.tiny))
    if Path(source).is_dir():
        return load_spec(source)
    stored = HF_CONFIGS / f"{source.split('/')[-1]}.json"
    if stored.is_file():
        return spec_from_hf_config(json.loads(stored.read_text()))
    from qrl_megatron.models.base import prepare_base_model

    return load_spec(prepare_base_model(cfg.model, cfg.run.cache_dir))


def sequence_tokens(cfg: Any, spec: Any) -> tuple[int, int]:
    """(prompt tokens, learner sequence length) the plan assumes: task.max_prompt_tokens, else gpu.prompt_tokens,
    capped by the model's positions, plus rollout.max_new_tokens, rounded up to 8 as the learner does."""
    new = cfg.rollout.max_new_tokens
    prompt = cfg.task.max_prompt_tokens or cfg.gpu.prompt_tokens
    prompt = max(1, min(prompt, spec.max_position_embeddings - new))
    return prompt, min(-(-(prompt + new) // 8) * 8, spec.max_position_embeddings)


def _engine_weights(plain: list[Entry], spec: Any, quant: str, rtp: int) -> int:
    """Bytes of one engine rank's weights: linears in ``quant``'s checkpoint layout, the rest bf16, split over
    rollout.tp by the same rules as the learner's (vLLM's vocabulary-parallel embedding and lm_head included)."""
    from qrl_megatron.lora.adapter import module_shape
    from qrl_megatron.lora.layers import FUSED_MEMBERS
    from te_ext.formats import format_descriptor

    fmt = format_descriptor(quant)
    total = 0
    for e in plain:
        linear = next((k for k in FUSED_MEMBERS if e.name.endswith(f"{k}.weight")), None)
        if linear is None:
            nbytes = e.numel * 2
        else:
            nbytes = sum(
                math.prod(shape) * dtype.itemsize
                for m in FUSED_MEMBERS[linear]
                for _, shape, dtype in fmt.checkpoint_layout(module_shape(spec, m))
            )
        total += nbytes // rtp if e.tp_split else nbytes
    return total


_ENTRY_CACHE: dict[tuple[Any, ...], list[Entry]] = {}


def _entries(spec: Any, learner: Any, layout: Any) -> list[Entry]:
    lora = learner.lora
    key = (repr(spec), learner.precision, lora.rank, tuple(lora.targets), lora.train_norms, learner.base_format)
    if key not in _ENTRY_CACHE:
        _ENTRY_CACHE[key] = parameter_entries(spec, learner, layout)
    return _ENTRY_CACHE[key]


def make_plan(cfg: Any, spec: Any, layout: Any, name: str = "") -> Plan:
    """The per-GPU plan of ``cfg`` (a validated QRLConfig); ``layout``: a TP1 x PP1 layout for the meta build."""
    lc, rc, gpu = cfg.learner, cfg.rollout, cfg.gpu
    tp, pp, dp = lc.tp, lc.pp, lc.dp
    elem = 2 if lc.precision == "bf16" else 4
    entries = _entries(spec, lc, layout)
    plain_learner = replace(lc, lora=replace(lc.lora, rank=0), base_format="bf16", precision="bf16")
    plain = _entries(spec, plain_learner, layout)
    plan = Plan(config=name, memory_gb=gpu.memory_gb)
    plan.layout = f"learner TP{tp} x PP{pp} x DP{dp}, engine {rc.engine} TP{rc.tp} {rc.quant}"

    # --- the learner's largest stage -------------------------------------------------------------------------
    recompute = getattr(lc, "recompute", "none")
    chunk = getattr(lc, "logprob_chunk_tokens", 0)
    budget = getattr(lc, "micro_batch_tokens", 0)
    _, seq = sequence_tokens(cfg, spec)
    per_rank = rc.prompts_per_step * rc.samples_per_prompt // (dp * cfg.algo.minibatches)
    sequences = max(1, budget // seq) if budget > 0 else min(lc.micro_batch_size, per_rank)
    micro_batches = max(1, -(-per_rank // sequences))
    layers = spec.num_layers // pp
    layer_spec = gpu.layer_spec if gpu.layer_spec != "auto" else ("local" if lc.lora.enabled else "te")
    stages = []
    for stage in range(pp):
        mem = stage_memory(stage_entries(entries, spec, pp, stage), tp, dp, lc)
        in_flight = min(pp - stage, micro_batches)
        acts = {}
        for mode in ("none", "selective", "full"):
            saved, transient = layer_activation_bytes(spec, sequences, seq, tp, elem, layer_spec, mode)
            acts[mode] = in_flight * layers * saved + transient
        last = stage == pp - 1
        logits = logits_bytes(sequences * seq, spec.vocab_size, tp, elem, chunk) if last else 0
        total = sum(mem.values()) + acts[recompute] + logits
        stages.append((total, stage, mem, acts, logits, in_flight))
    _, stage, mem, acts, logits, in_flight = max(stages)
    weights = mem["base_weights"] + mem["adapter"] + mem["trained_norms"] + mem["full_parameters"]
    where = f"stage {stage} of {pp}, {layers} layers, 1/{tp} of the TP-split tensors"
    plan.add("learner.weights", weights, where)
    fmt = "NVFP4 codes + bf16 rest" if lc.base_format == "nvfp4" and lc.lora.enabled else lc.precision
    plan.add("learner.base_weights", mem["base_weights"], f"frozen base ({fmt})", counted=False)
    plan.add("learner.full_parameters", mem["full_parameters"], f"trained, {lc.precision}", counted=False)
    plan.add("learner.adapter", mem["adapter"], f"LoRA r={lc.lora.rank}", counted=False)
    plan.add("learner.trained_norms", mem["trained_norms"], "", counted=False)
    plan.add("learner.gradients", mem["gradients"], "fp32 grad buffer (grad_reduce_in_fp32)")
    shard = f"/ DP{dp} (distributed optimizer)" if lc.distributed_optimizer and dp > 1 else "not sharded"
    master = " + fp32 master" if lc.precision == "bf16" else ""
    plan.add("learner.optimizer_state", mem["optimizer_state"], f"Adam 2 fp32 moments{master}, {shard}")
    act_note = f"{sequences} seq x {seq} tokens x {in_flight} in flight, {layer_spec} layer spec"
    plan.add("learner.activations", acts[recompute], f"learner.recompute={recompute}: {act_note}")
    for mode in ("none", "selective", "full"):
        plan.add(f"learner.activations_{mode}", acts[mode], f"with learner.recompute={mode}", counted=False)
    plan.add(
        "learner.logits",
        logits,
        f"last stage; fp32 softmax over {'chunks of ' + str(chunk) if chunk else 'all'} tokens",
    )
    learner_tensors = sum(plan.items[k] for k in list(plan.counted))
    plan.add("learner.cuda_context", CUDA_CONTEXT_BYTES, "CUDA context, cuBLAS workspace, NCCL buffers")
    plan.add("learner.fragmentation", FRAGMENTATION * learner_tensors, f"{FRAGMENTATION:.0%} of the learner's tensors")
    learner_keys = list(plan.counted)

    # --- the engine (one rank of rollout.tp) ------------------------------------------------------------------
    rtp = rc.tp
    big = gpu.memory_gb * GB >= 70 * 2**30
    eng_weights = _engine_weights(plain, spec, rc.quant, rtp)
    plan.add("engine.weights", eng_weights, f"{rc.quant} linears, bf16 embeddings/norms, 1/{rtp} per engine rank")
    if lc.lora.enabled:
        adapter = sum(e.numel * 2 // (rtp if e.tp_split else 1) for e in entries if e.kind == "adapter")
        plan.add("engine.adapter", adapter, "bf16 LoRA slot (max_loras=1)")
    prompt, _ = sequence_tokens(cfg, spec)
    kv_heads = max(1, spec.num_query_groups // rtp)
    per_token = spec.num_layers * 2 * kv_heads * spec.kv_channels * 2
    seqs = min(rc.prompts_per_step * rc.samples_per_prompt, VLLM_MAX_SEQS[big])
    needed = seqs * (prompt + rc.max_new_tokens) * per_token
    tokens = VLLM_BATCHED_TOKENS[big]
    eng_acts = (
        tokens * (2 * spec.ffn_hidden_size // rtp + 4 * spec.hidden_size) * 2
        + VLLM_MAX_SEQS[big] * (spec.vocab_size // rtp) * 4 * 2
    )
    eng_adapter = plan.items.get("engine.adapter", 0)
    kv_mib = rc.kv_cache_mib
    if kv_mib > 0:
        kv = kv_mib * 2**20
        kv_note = f"rollout.kv_cache_mib={kv_mib} (vLLM kv_cache_memory_bytes: allocated as given)"
    else:
        # vLLM: the KV cache is what is left of utilization x GPU after its weights, profile peak and context
        util = getattr(rc, "gpu_memory_utilization", 0.9)
        kv = max(0, int(util * gpu.memory_gb * GB - eng_weights - eng_adapter - eng_acts - CUDA_CONTEXT_BYTES))
        kv_note = f"rollout.kv_cache_mib=0: what rollout.gpu_memory_utilization={util} leaves"
    plan.add("engine.kv_cache", kv, kv_note)
    full_batch = f"{seqs} seqs x ({prompt} + {rc.max_new_tokens}) tokens"
    plan.add("engine.kv_cache_for_batch", needed, f"{full_batch} concurrently (less: vLLM queues)", counted=False)
    plan.add("engine.activations", eng_acts, f"profile run: {tokens} batched tokens, {VLLM_MAX_SEQS[big]} seqs' logits")
    plan.add("engine.cuda_context", CUDA_CONTEXT_BYTES, "the engine worker's own process")
    if not rc.enforce_eager:
        plan.add("engine.cuda_graphs", CUDA_GRAPHS_BYTES, "rollout.enforce_eager=false")
    engine_tensors = eng_weights + eng_adapter + kv + eng_acts
    plan.add("engine.fragmentation", FRAGMENTATION * engine_tensors, f"{FRAGMENTATION:.0%} of the engine's tensors")
    engine_keys = [k for k in plan.counted if k.startswith("engine.")]

    # --- peak per GPU ---------------------------------------------------------------------------------------
    learner_total = sum(plan.items[k] for k in learner_keys)
    engine_total = sum(plan.items[k] for k in engine_keys)
    plan.phases["learner"] = learner_total
    plan.phases["engine"] = engine_total
    if rc.engine != "colocated":
        plan.peak = max(learner_total, engine_total)  # the server engine has GPUs of its own
        plan.phases["peak (separate GPUs)"] = plan.peak
        return plan
    sleep = getattr(rc, "sleep_level", 0)
    offload = getattr(lc, "offload_optimizer", False)
    if sleep:
        # learner phase: the engine keeps its context and graphs; rollout phase: the learner keeps its weights and
        # gradient buffer (its activations are released), its optimizer state too unless offloaded
        resident = plan.items["engine.cuda_context"] + plan.items.get("engine.cuda_graphs", 0)
        # (level 1 moves the weights to host RAM, level 2 drops them: neither stays on the GPU; the KV cache goes)
        learner_idle = (
            plan.items["learner.weights"]
            + plan.items["learner.gradients"]
            + (0 if offload else plan.items["learner.optimizer_state"])
            + plan.items["learner.cuda_context"]
        )
        plan.phases["learner phase (engine asleep)"] = learner_total + resident
        plan.phases["rollout phase"] = engine_total + learner_idle
        plan.peak = max(plan.phases["learner phase (engine asleep)"], plan.phases["rollout phase"])
    else:
        plan.phases["both (engine awake throughout)"] = learner_total + engine_total
        plan.peak = learner_total + engine_total
    return plan


# ---------------------------------------------------------------------------------------------------------------
def _fixes(cfg: Any) -> list[tuple[str, list[str]]]:
    """Candidate single changes, cheapest first."""
    lc, rc = cfg.learner, cfg.rollout
    out: list[tuple[str, list[str]]] = []
    if getattr(lc, "recompute", "none") != "full":
        out.append(("learner.recompute=selective", ["learner.recompute=selective"]))
        out.append(("learner.recompute=full", ["learner.recompute=full"]))
    if lc.micro_batch_size > 1:
        out.append(("learner.micro_batch_size=1", ["learner.micro_batch_size=1"]))
    if rc.kv_cache_mib > 4096:
        out.append(("rollout.kv_cache_mib=4096", ["rollout.kv_cache_mib=4096"]))
    if not lc.lora.enabled and rc.tp == 1 and cfg.algo.kl_coef == 0:
        qerl = [
            "learner.lora.rank=32",
            "learner.base_format=nvfp4",
            "rollout.quant=nvfp4",
            "trainer.save_every=0",
            "trainer.checkpoint=false",
        ]
        out.append((QERL_FIX, qerl))
        # learner and a colocated engine each hold the NVFP4 base: at 32B the two awake together pass 80 GB by a few
        # GB, which vLLM's sleep mode (the engine's weights and KV cache released in the learner phase) wins back
        if rc.engine == "colocated" and rc.sleep_level == 0:
            out.append((f"{QERL_FIX} + rollout.sleep_level=1", [*qerl, "rollout.sleep_level=1"]))
    per_node = cfg.gpu.per_node
    if lc.tp * 2 <= per_node:
        out.append((f"learner.tp={lc.tp * 2} (more GPUs)", [f"learner.tp={lc.tp * 2}"]))
    out.append((f"learner.pp={lc.pp * 2} (more GPUs)", [f"learner.pp={lc.pp * 2}"]))
    return out


def cheapest_fix(path: str | None, overrides: list[str], cfg: Any, spec: Any, layout: Any) -> str:
    """The first candidate change whose plan fits, else the one that brings the peak lowest."""
    from qrl_megatron.config import load_config

    best: tuple[float, str] | None = None
    singles = _fixes(cfg)
    full = [f for f in singles if f[0] == "learner.recompute=full"]
    pairs = [(f"{a} + {b}", [*x, *y]) for a, x in full for b, y in singles if b.split("=")[0] != a.split("=")[0]]
    for label, extra in [*singles, *pairs]:
        try:
            alt = load_config(path, [*overrides, *extra])
        except ConfigError:
            continue
        try:
            p = make_plan(alt, spec, layout)
        except ValueError:
            continue
        if p.fits:
            return f"cheapest fix: {label} (peak {p.peak / GB:.1f} GB)"
        if best is None or p.peak < best[0]:
            best = (p.peak, label)
    if best is None:
        return "no single change fits: use more GPUs (learner.tp / learner.pp) or a smaller model"
    return f"no single change fits; closest: {best[1]} (peak {best[0] / GB:.1f} GB), combine it with more GPUs"


def check_plan(path: str | None, overrides: list[str], cfg: Any) -> str | None:
    """None when the plan of ``cfg`` fits ``gpu.memory_gb`` (or ``gpu.check`` is off); else the one-line refusal
    naming the largest items and the cheapest fix. Reads no weights and starts no process."""
    if not cfg.gpu.check:
        return None
    spec = model_spec(cfg)
    with megatron_warnings_quiet(), one_rank_parallel_state() as layout:
        plan = make_plan(cfg, spec, layout, path or "defaults")
        if plan.fits:
            return None
        fix = cheapest_fix(path, overrides, cfg, spec, layout)
    largest = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in plan.largest())
    return (
        f"the memory plan does not fit: {plan.peak / GB:.1f} GB per GPU > gpu.memory_gb={cfg.gpu.memory_gb:g} "
        f"(largest: {largest}); {fix}; `qrl-plan {path or ''}` shows the table, gpu.check=false skips the check"
    )


def main(argv: list[str] | None = None) -> int:
    from qrl_megatron.config import load_config

    parser = argparse.ArgumentParser(prog="qrl-plan", description="Per-GPU memory plan of a qrl-train recipe.")
    parser.add_argument("config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        spec = model_spec(cfg)
    except ConfigError as err:
        print(f"qrl-plan: config error: {err}", file=sys.stderr)
        return 2
    with megatron_warnings_quiet(), one_rank_parallel_state() as layout:
        plan = make_plan(cfg, spec, layout, args.config)
        fix = "" if plan.fits else cheapest_fix(args.config, args.overrides, cfg, spec, layout)
    if args.json:
        out = plan.to_json()
        out["fix"] = fix
        print(json.dumps(out, indent=1))
    else:
        print(plan.table())
        if fix:
            print(f"  {fix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
