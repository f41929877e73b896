"""The resharding bridge as the loop's weight-sync stage: plan -> execute -> transport -> verify, every step.

Runs on every learner rank (all of them take part in gathering); rank ``dst`` (the one driving the engine) streams
each bucket into the engine as soon as it is assembled, so the extra memory of a sync is one bucket. Verification
is two-fold: the engine checks a CRC-32 of every tensor against the sender's before loading it (a corrupted tensor
is an error naming it, and never reaches the model), and every ``sync.probe_every`` syncs a logprob probe compares
the engine with the learner's own forward on the weights the engine was sent (:class:`LogprobProbe`: each module's
parameters swapped, one at a time, for the bridge's quantize -> dequantize of them; no second model is built), so a
stale or mis-loaded engine stops the run instead of silently producing rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from qrl_megatron.bridge.checksum import WeightVerificationError, checksums

# the executor's per-unit steps (private there: the probe is their one other user)
from qrl_megatron.bridge.execute import _assemble, _to_wire, check_layout, execute_bucket, local_parameters
from qrl_megatron.bridge.plan import SyncPlan, TransferUnit

Tensors = dict[str, torch.Tensor]


class LogprobProbe:
    """Engine logprobs of fixed sequences vs the learner's own forward on the weights the engine was sent.

    Collective over the learner world (every rank takes part in the learner forward, as in the adapter sync's
    probe). No second model is built: during the probe forward a pre-hook on every learner module swaps the
    module's own (local shard of its) parameters for what the engine holds -- quantized linears: the bridge's own
    assemble -> wire -> decode of that parameter (TP gather or shard-local quantize with the all-reduced statistic,
    the HF split, te_ext's quantize -> dequantize), sliced back to this rank's shard; everything else: its bf16
    cast -- and a forward hook puts the learner's tensor back. The extra memory is one parameter's full tensors
    (its quantized and decoded forms) at a time, never a model. For the W8A8 formats (fp8 / int8) the inputs of the
    quantized linears are quantized per token as the engine does (te_ext), per engine-TP shard of the full
    activation, so the reference compares like with like.
    """

    def __init__(self, plan: SyncPlan, sequences: Sequence[Sequence[int]], dst: int = 0) -> None:
        from te_ext.formats import format_descriptor

        self.plan, self.dst = plan, dst
        self.activation_fmt = format_descriptor(plan.target.fmt).activation_format
        self.sequences = [list(s) for s in sequences if len(s) > 1]
        if not self.sequences:
            raise ValueError("the logprob probe needs at least one sequence of two or more tokens")

    def __call__(self, learner: Any, engine: Any | None) -> tuple[float, float] | None:
        """Collective: (max, mean) |engine - reference| logprob over all probe tokens, on ``dst`` (None elsewhere)."""
        expected = self.reference(learner)
        if expected is None:
            return None
        assert engine is not None
        return logprob_gaps(engine.prompt_logprobs(self.sequences), expected)

    def reference(self, learner: Any) -> list[list[float]] | None:
        """Collective: the learner's logprobs of the probe tokens with the engine's weights swapped in, on ``dst``."""
        from qrl_megatron.bridge.adapter_sync import learner_prompt_logprobs

        with EngineWeightsView(self.plan, learner, self.activation_fmt):
            return learner_prompt_logprobs(learner, self.sequences, self.dst)


_WORD_EMBEDDING = "embedding.word_embeddings.weight"


class EngineWeightsView:
    """While active, every learner module computes with the weights the engine holds (see :class:`LogprobProbe`).

    Hooks on the learner's modules, registered on entry and removed (with every swapped tensor restored) on exit,
    also when the forward fails."""

    def __init__(self, plan: SyncPlan, learner: Any, activation_fmt: str | None = None) -> None:
        from qrl_megatron.learner.model import unwrap_model

        self.plan, self.layout, self.activation_fmt = plan, learner.layout, activation_fmt
        units = {u.source: u for u in plan.units}
        by_id = {
            id(p): (units[n], p)
            for n, p in local_parameters(learner.model, plan.spec, learner.layout).items()
            if n in units
        }
        self.modules: list[tuple[torch.nn.Module, list[tuple[TransferUnit, torch.Tensor]]]] = []
        for module in unwrap_model(learner.model).modules():
            owned = [by_id[id(p)] for p in module.parameters(recurse=False) if id(p) in by_id]
            if owned:
                self.modules.append((module, owned))
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> EngineWeightsView:
        for module, owned in self.modules:
            self.handles.append(module.register_forward_pre_hook(partial(self._swap_in, owned)))
            self.handles.append(module.register_forward_hook(partial(self._swap_out, owned)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for param, original in self.saved.values():
            param.data = original
        self.saved.clear()

    def _swap_in(self, owned: list[tuple[TransferUnit, torch.Tensor]], module: Any, args: tuple) -> Any:
        for unit, param in owned:
            engine_view = self.engine_view(unit, param)
            if engine_view is not None:
                self.saved[id(param)] = (param, param.data)
                param.data = engine_view
        # a W8A8 linear's input, unless the module fuses the norm in front of it (TE's LayerNorm-linear: its input is
        # not the GEMM's, and the emulation is skipped -- the probe then also sees the activation quantization error)
        quantized = [u for u, _ in owned if u.fmt != "bf16"]  # the weight (a bias stays bf16)
        fused_norm = any("layernorm" in u.source for u, _ in owned)
        if quantized and not fused_norm and self.activation_fmt is not None and args and torch.is_tensor(args[0]):
            return (self._quantize_input(args[0], quantized[0]), *args[1:])
        return None

    def _swap_out(self, owned: list[tuple[TransferUnit, torch.Tensor]], module: Any, args: tuple, out: Any) -> Any:
        for _, param in owned:
            saved = self.saved.pop(id(param), None)
            if saved is not None:
                param.data = saved[1]
        unit, param = owned[0]
        if unit.source == _WORD_EMBEDDING and param.dtype != torch.bfloat16 and isinstance(out, torch.Tensor):
            return out.to(torch.bfloat16).to(out.dtype)  # the looked-up rows of the bf16 table
        return None

    def engine_view(self, unit: TransferUnit, param: torch.Tensor) -> torch.Tensor | None:
        """This rank's shard of ``unit`` as the engine holds it, in the parameter's dtype (None: it is already)."""
        from megatron.core import parallel_state

        from qrl_megatron.models.hf_mapping import assemble_megatron_shard, megatron_shard_slices

        if unit.fmt == "bf16":  # passthrough: the engine holds the bf16 cast
            if param.dtype == torch.bfloat16 or unit.source == _WORD_EMBEDDING:  # (a lookup: its output is rounded)
                return None
            view = torch.empty_like(param)
            for rows, src in zip(view.split(4096), param.detach().split(4096), strict=True):  # one copy, no bf16 one
                rows.copy_(src.to(torch.bfloat16))
            return view
        spec, layout = self.plan.spec, self.layout
        group = parallel_state.get_tensor_model_parallel_group()
        # the bridge's own steps (execute.py), so the codes and scales are the ones it streams
        hf = decode_wire(_to_wire(unit, _assemble(unit, param, layout, group, spec), spec), unit.fmt)
        slices = megatron_shard_slices(
            unit.source, spec, layout.tp, layout.tp_rank, {n: tuple(t.shape) for n, t in hf.items()}
        )
        pieces = [hf[s.name].narrow(s.dim, s.start, s.stop - s.start) for s in slices]
        return assemble_megatron_shard(unit.source, pieces, spec, layout.tp).to(param.dtype).contiguous()

    def _quantize_input(self, x: torch.Tensor, unit: TransferUnit) -> torch.Tensor:
        """Per-token W8A8 activation quantization of a quantized linear's input, as the engine computes it: per
        token over each engine-TP rank's slice of the input (a row-parallel input is gathered over the learner's
        TP group first, and this rank's part of the result kept)."""
        import te_ext

        assert self.activation_fmt is not None
        row_split = unit.split == "row"
        tp, engine_tp = self.layout.tp, self.plan.target.engine_tp
        full = x
        if row_split and tp > 1:
            from megatron.core import parallel_state

            shards = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(shards, x.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            full = torch.cat(shards, dim=-1)
        parts = full.chunk(engine_tp, dim=-1) if row_split else (full,)
        fake = []
        for part in parts:
            rows = part.reshape(-1, part.shape[-1])
            fake.append(te_ext.quantize_activation_per_token(rows, self.activation_fmt).dequantize(torch.float32))
        out = torch.cat(fake, dim=-1).reshape(full.shape).to(x.dtype)
        if row_split and tp > 1:
            out = out.chunk(tp, dim=-1)[self.layout.tp_rank]
        return out.contiguous()


def logprob_gaps(got: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(max, mean) |got - expected| over every token of every probe sequence."""
    gaps = [abs(a - b) for ra, rb in zip(got, expected, strict=True) for a, b in zip(ra, rb, strict=True)]
    return max(gaps), sum(gaps) / len(gaps)


def decode_wire(tensors: Tensors, fmt: str) -> Tensors:
    """The HF float32 weights a wire bucket encodes (what the engine computes with, up to its own arithmetic)."""
    if fmt == "bf16":
        return {k: v.float() for k, v in tensors.items()}
    from te_ext.vllm_export import dequantize_checkpoint

    return dequantize_checkpoint(tensors, fmt)


class BridgeWeightSync:
    def __init__(
        self,
        plan: SyncPlan,
        verify_checksums: bool = True,
        probe: LogprobProbe | None = None,
        probe_every: int = 0,
        probe_tolerance: float = 0.05,
        dst: int = 0,
    ) -> None:
        self.plan, self.verify_checksums, self.dst = plan, verify_checksums, dst
        self.probe, self.probe_every, self.probe_tolerance = probe, probe_every, probe_tolerance
        self.params: dict[str, torch.Tensor] | None = None
        self.quantized_names = {w.name for u in plan.units if u.fmt != "bf16" for w in u.wire}
        self.quantized_bf16_bytes = plan.quantized_bytes[1]

    def __call__(self, learner: Any, engine: Any | None, step: int) -> dict[str, float]:
        layout = learner.layout
        if self.params is None:
            check_layout(self.plan, layout)
            self.params = local_parameters(learner.model, self.plan.spec, layout)
        is_dst = layout.rank == self.dst
        if is_dst and engine is None:
            raise ValueError(f"weight sync: rank {self.dst} drives the engine but was given none")
        # every rank decides alike: the probe's learner forward is a collective of the whole learner world
        probing = self.probe is not None and self.probe_every > 0 and step % self.probe_every == 0
        sent = sent_quantized = 0
        failure: BaseException | None = None
        start = time.perf_counter()
        if is_dst:
            try:
                engine.start_weight_update()  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - re-raised once the collectives are done
                failure = e
        for index in range(self.plan.num_buckets):
            # every bucket is executed even after a failure: the other ranks are in its collectives
            wire = execute_bucket(self.plan, index, self.params, layout, self.dst)
            if wire is None or failure is not None:
                continue
            sums = checksums(wire) if self.verify_checksums else {}
            try:
                engine.update_weights(wire, sums)  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - re-raised once the collectives are done
                failure = e
                continue
            sent += sum(t.numel() * t.element_size() for t in wire.values())
            sent_quantized += sum(t.numel() * t.element_size() for n, t in wire.items() if n in self.quantized_names)
        if is_dst and failure is None:
            try:
                engine.finish_weight_update()  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - re-raised once the probe's collectives are done
                failure = e
        seconds = time.perf_counter() - start
        # the learner side of the probe runs on every rank, also after a failure (the others are in its collectives)
        reference = self.probe.reference(learner) if probing and self.probe is not None else None
        if not is_dst:
            return {}
        if failure is not None:
            raise failure
        metrics = {
            "sync_seconds": seconds,
            "sync_bytes": float(sent),
            "sync_gbps": sent / max(seconds, 1e-9) / 1e9,
            "sync_bytes_vs_bf16": sent / max(self.plan.bf16_bytes, 1),
        }
        if self.quantized_bf16_bytes:  # the quantized linears alone (embeddings and norms stay bf16)
            metrics["sync_quantized_vs_bf16"] = sent_quantized / self.quantized_bf16_bytes
        if reference is not None:
            assert self.probe is not None
            got = engine.prompt_logprobs(self.probe.sequences)  # type: ignore[union-attr]
            gap_max, gap_mean = logprob_gaps(got, reference)
            metrics.update(
                probe_gap_max=gap_max, probe_gap_mean=gap_mean, probe_seconds=time.perf_counter() - start - seconds
            )
            # Gate on the mean: the max is dominated by bf16 rounding of large logits on unlikely tokens, while a
            # mis-loaded or stale tensor shifts every token.
            if not gap_mean <= self.probe_tolerance:
                raise WeightVerificationError(
                    f"logprob probe after the sync of step {step}: the engine is {gap_mean:.4f} nats on average (max "
                    f"{gap_max:.4f}) off the learner's forward of the weights it was sent, above sync.probe_tolerance="
                    f"{self.probe_tolerance}; the engine did not load what the learner sent"
                )
        return metrics
