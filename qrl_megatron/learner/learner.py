"""The Megatron learner on one rank: model chunk + DDP + optimizer, log-probabilities and one policy update.

All ranks of the TP×PP×DP world call the same methods with their DP share of the batch; Megatron's pipeline
schedule moves activations between stages, and the loss lives on the last stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qrl_megatron.learner.batch import TokenBatch, token_budget_groups
from qrl_megatron.learner.config import LearnerConfig
from qrl_megatron.learner.model import build_gpt_model, gather_hf_state_dict, load_hf_state_dict
from qrl_megatron.learner.precision import apply_precision, precision_autocast
from qrl_megatron.models.registry import ModelSpec
from qrl_megatron.platform import ParallelLayout, device

# loss_fn(logprobs, batch, scale) -> (scaled loss, {metric: summed value}); scale turns a per-micro-batch sum into
# its share of the global mean (see Learner._scale).
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def scheduled_lr(
    peak: float,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_ratio: float = 0.1,
) -> float:
    """Learning rate of optimizer step `step`: linear warm-up to `peak`, then constant or cosine decay.

    The cosine reaches `peak * min_ratio` at `total_steps`. The RL phase counts steps from 1 with the
    `learner.lr_*` settings; the warm-start counts from 0 with no warm-up (cosine to 10%: it is short, and a
    constant rate ends noisy).

    Warm-up: Adam's first updates move every parameter by about the learning rate whatever the gradient's size
    (the second-moment estimate is still tiny); with noisy policy gradients that is a random jump, measured on the
    tiny model as a reward drop from 0.59 to 0.42 after one step at 1e-4. Decay: at a constant rate the held-out
    accuracy kept oscillating by +-5 points late in the run, and the final policy is the one that is kept.
    """
    if warmup_steps and step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def recompute_overrides(mode: str) -> dict[str, Any]:
    """TransformerConfig fields for ``learner.recompute``: nothing, core-attention recompute, or every layer.

    ``full`` re-runs each transformer layer (its LoRA adapters included) in the backward from the layer's input,
    one layer per checkpoint, so only each layer's input stays alive; ``selective`` keeps the layer's activations
    except core attention's (the [b, heads, s, s] scores and probabilities), which are cheap to recompute.
    """
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"learner.recompute={mode!r} is not allowed; choose one of none, selective, full")


def _rows_logprob_entropy(
    full: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token logprob and entropy of full-vocabulary logit rows (the one formula both code paths run)."""
    logp = torch.log_softmax(full.float() / temperature, dim=-1)
    token_logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Token logprobs and entropy over chunks of tokens, saving only the (TP-sharded) logits for the backward.

    Forward: each chunk of rows is gathered over TP and run through :func:`_rows_logprob_entropy`; the fp32
    softmax of a chunk is freed before the next one. Backward: each chunk is gathered again and the same formula
    is differentiated on it (so per row the backward is the very computation of the unchunked autograd graph),
    and this rank keeps its vocabulary slice of the chunk's gradient -- what the backward of
    ``gather_from_tensor_model_parallel_region`` (a split along the vocabulary) does: every TP rank computes the
    same loss from the same gathered logits, so no reduction is needed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, temperature: float, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        token_logp = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(token_logp)
        for a in range(0, flat.shape[0], chunk):
            full = gather_from_tensor_model_parallel_region(flat[a : a + chunk])
            token_logp[a : a + chunk], entropy[a : a + chunk] = _rows_logprob_entropy(
                full, flat_labels[a : a + chunk], temperature
            )
        ctx.save_for_backward(logits, labels)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an unused output (e.g. entropy without a bonus) costs no backward
        return token_logp.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> Any:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits, labels = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        width = flat.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * width
        grad = torch.empty_like(flat)
        chunk = ctx.chunk
        for a in range(0, flat.shape[0], chunk):
            full = gather_from_tensor_model_parallel_region(flat[a : a + chunk]).detach().requires_grad_()
            with torch.enable_grad():
                token_logp, entropy = _rows_logprob_entropy(full, flat_labels[a : a + chunk], ctx.temperature)
                pairs = [
                    (out, g.reshape(-1)[a : a + chunk])
                    for out, g in ((token_logp, grad_logp), (entropy, grad_entropy))
                    if g is not None
                ]
                (grad_full,) = torch.autograd.grad([o for o, _ in pairs], [full], [g for _, g in pairs])
            grad[a : a + chunk] = grad_full[:, start : start + width]
        return grad.view_as(logits), None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label and the entropy of the full-vocabulary distribution, from TP-sharded logits.

    `temperature` divides the logits first: the engine samples (and reports logprobs) from the tempered
    distribution, so the learner's proximal and current policies must be the same tempered distribution or the
    importance ratios are biased by the temperature alone.

    ``chunk_tokens > 0`` (``learner.logprob_chunk_tokens``): no full ``[tokens, vocab]`` fp32 tensor, neither in
    the forward nor saved for the backward -- at most one chunk's ``[chunk_tokens, vocab]`` softmax at a time
    (:class:`_ChunkedLogprobEntropy`); the values and gradients are those of ``chunk_tokens=0``, bit for bit.
    ``0``: one pass over all tokens, autograd saving the fp32 log-softmax (several ``[tokens, vocab]`` fp32 tensors).
    """
    if chunk_tokens > 0:
        token_logp, entropy = _ChunkedLogprobEntropy.apply(logits, labels, temperature, chunk_tokens)
        return token_logp, entropy
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return _rows_logprob_entropy(gather_from_tensor_model_parallel_region(logits), labels, temperature)


def _input_requires_grad(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the embedding's output requires grad in training, also when the embedding is frozen."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


class Learner:
    def __init__(
        self,
        spec: ModelSpec,
        layout: ParallelLayout,
        cfg: LearnerConfig,
        weights: Mapping[str, torch.Tensor],
        lr: float,
        seq_length: int,
        temperature: float = 1.0,
        trainable: bool = True,
        *,
        frozen_base: Any = None,
        seed: int = 0,
    ) -> None:
        """``weights``: the HF weights to start from, best a lazy
        :class:`~qrl_megatron.models.checkpoint_reader.CheckpointReader` (this rank then reads only its own shard
        from the files) or an in-memory HF state dict. ``trainable=False``: a frozen copy (the KL reference policy)
        -- no gradients, no optimizer state. With ``cfg.lora.rank > 0`` (QeRL mode) the loaded model is frozen and
        only the adapter (``seed`` draws its initial ``A``) and optionally the norms train; ``frozen_base``: the
        NVFP4 checkpoint whose codes replace the dense linears (``cfg.base_format=nvfp4``)."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.spec, self.layout, self.cfg, self.seq_length = spec, layout, cfg, seq_length
        self.temperature = temperature
        self.device = device()  # batches, positions and metric reductions live here (NCCL takes no CPU tensors)
        self.params_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        # No random initialisation: every parameter is read from `weights` below (the strict loader checks that), and
        # megatron's CPU initialisation builds each weight's FULL fp32 master copy first -- for a 0.5B model's
        # embedding 545 MB on every rank, more than the rank's whole bf16 shard at TP=2. The flag is restored so
        # that modules added later (adapters, precision wrappers) initialise as usual.
        lora = cfg.lora.enabled
        overrides: dict[str, Any] = {"perform_initialization": False, **recompute_overrides(cfg.recompute)}
        if cfg.micro_batch_tokens and layout.pp > 1:
            # micro-batches of different shapes: the stages exchange each activation's shape before the tensor
            overrides["variable_seq_lengths"] = True
            # megatron refuses variable shapes with its default MoE dispatcher even in a dense model; this one
            # is only ever used by MoE layers
            overrides["moe_token_dispatcher_type"] = "alltoall"
        module = build_gpt_model(
            spec,
            layout,
            params_dtype=self.params_dtype,
            config_overrides=overrides,
            # the adapter wraps Megatron's own column/row-parallel linears (TE's fuse the norm into linear_qkv)
            use_te=False if lora else None,
        )
        module.config.perform_initialization = True
        self.te_recipe = apply_precision(module, cfg.precision)  # fp8/nvfp4: TE recipe on GPU, else emulation
        load_hf_state_dict(module, weights, spec, layout)
        if lora:
            from qrl_megatron.lora.layers import apply_lora

            if cfg.base_format == "nvfp4" and frozen_base is None:
                raise ValueError("learner.base_format=nvfp4 needs the NVFP4 checkpoint of the base (frozen_base)")
            apply_lora(
                module,
                spec,
                layout,
                cfg.lora.adapter(),
                seed=seed,
                frozen_base=frozen_base if cfg.base_format == "nvfp4" else None,
            )
        if not trainable:
            module.requires_grad_(False)  # DDP then allocates no gradient buffers for it
        elif cfg.recompute == "full" and layout.is_first_stage:
            # Megatron's layer checkpoint is reentrant: its backward runs only if an input requires grad. With a
            # frozen embedding (LoRA) the first layer's input does not, and every adapter would get no gradient.
            module.embedding.register_forward_hook(_input_requires_grad)
        self.config = module.config
        self.config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.distributed_optimizer,
        )
        self.model = DistributedDataParallel(self.config, ddp_config, module)
        self.optimizer: Any = None
        if not trainable:
            return
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=0.9,
                adam_beta2=cfg.adam_beta2,
                clip_grad=cfg.grad_clip,
                bf16=cfg.precision == "bf16",
                params_dtype=self.params_dtype,
                use_distributed_optimizer=cfg.distributed_optimizer,
            ),
            [self.model],
        )

    # ------------------------------------------------------------------------------------------------------------
    def _microbatches(self, batch: TokenBatch) -> list[tuple[TokenBatch, torch.Tensor | None]]:
        """This rank's micro-batches on the learner's device, each with the batch rows it holds (None: in order).

        ``learner.micro_batch_tokens=0``: equal micro-batches of at most learner.micro_batch_size sequences, at the
        batch's length. Otherwise :func:`~qrl_megatron.learner.batch.token_budget_groups`: similar lengths
        together, each micro-batch cut to its own padded longest sequence.
        """
        if not self.cfg.micro_batch_tokens or not len(batch):  # (an empty share still runs one empty micro-batch)
            return [(mb.to(self.device), None) for mb in batch.split(self.num_microbatches(len(batch)))]
        lengths = batch.needed_lengths().tolist()
        groups = token_budget_groups(lengths, self.cfg.micro_batch_tokens, max_length=batch.tokens.shape[1])
        out: list[tuple[TokenBatch, torch.Tensor | None]] = []
        for rows, width in groups:
            index = torch.tensor(rows, dtype=torch.long)
            out.append((batch.select(index).truncated(width).to(self.device), index))
        return out

    def _run_schedule(
        self,
        microbatches: list[tuple[TokenBatch, torch.Tensor | None]],
        loss_func: Callable[..., Any],
        forward_only: bool,
    ) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
            mb: TokenBatch = next(data_iterator)
            length = mb.tokens.shape[1]
            positions = torch.arange(length, device=self.device).unsqueeze(0).expand(len(mb), -1)
            with precision_autocast(self.te_recipe):
                output = model(mb.tokens, positions, attention_mask=None)
            return output, partial(loss_func, mb)

        # seq_length / micro_batch_size only size the p2p buffers of PP > 1 (the no-pipelining schedule ignores
        # them); with variable shapes (learner.micro_batch_tokens) megatron exchanges each shape instead.
        first = microbatches[0][0]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([mb for mb, _ in microbatches]),
            model=[self.model],
            num_microbatches=len(microbatches),
            seq_length=first.tokens.shape[1],
            micro_batch_size=len(first),
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    def num_microbatches(self, sequences: int) -> int:
        """Micro-batches of at most learner.micro_batch_size sequences (equal sizes: static pipeline shapes)."""
        count = max(1, -(-sequences // self.cfg.micro_batch_size))
        if sequences % count:
            raise ValueError(
                f"{sequences} sequences on this rank do not split into {count} equal micro-batches of at most "
                f"learner.micro_batch_size={self.cfg.micro_batch_size}; pick a micro-batch size that divides it"
            )
        return count

    def logprobs(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token logprobs [B, S], entropy [B, S]) of this rank's batch on the last stage; None on other stages."""

        def collect(mb: TokenBatch, logits: torch.Tensor, non_loss_data: bool = True) -> Any:
            return token_logprobs_and_entropy(logits, mb.labels, self.temperature, self.cfg.logprob_chunk_tokens)

        microbatches = self._microbatches(batch)
        self.model.eval()
        with torch.no_grad():
            outputs = self._run_schedule(microbatches, collect, forward_only=True)
        self.model.train()
        if not self.layout.is_last_stage:
            return None
        if microbatches[0][1] is None:
            return torch.cat([o[0] for o in outputs]).cpu(), torch.cat([o[1] for o in outputs]).cpu()
        # token-budget micro-batches: back to batch order and width; positions past a micro-batch's width carry no
        # loss (they lie after the sequence's last completion token) and read 0
        logp, entropy = torch.zeros(batch.tokens.shape), torch.zeros(batch.tokens.shape)
        for (mb, index), (mb_logp, mb_entropy) in zip(microbatches, outputs, strict=True):
            logp[index, : mb.tokens.shape[1]] = mb_logp.cpu()
            entropy[index, : mb.tokens.shape[1]] = mb_entropy.cpu()
        return logp, entropy

    def train_step(
        self, batch: TokenBatch, loss_fn: LossFn, total_tokens: float, total_seqs: float, lr: float | None = None
    ) -> dict[str, float]:
        """One optimizer step on this rank's batch; `total_*` are the global counts of the whole update (all DP ranks)."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        microbatches = self._microbatches(batch)
        num_microbatches = len(microbatches)
        # The schedule divides each micro-batch loss by num_microbatches and Megatron DDP averages gradients over
        # DP; loss_fn returns its share of the *global* mean, so undo both to keep the exact global normaliser.
        undo = float(num_microbatches * self.layout.dp)

        def loss_func(mb: TokenBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logp, entropy = token_logprobs_and_entropy(
                logits, mb.labels, self.temperature, self.cfg.logprob_chunk_tokens
            )
            loss, metrics = loss_fn(logp, mb, total_tokens=total_tokens, total_seqs=total_seqs, entropy=entropy)  # type: ignore[call-arg]
            metrics = {**metrics, "loss": loss.detach().clone(), "entropy_sum": (entropy.detach() * mb.loss_mask).sum()}
            return loss * undo, metrics

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(microbatches, loss_func, forward_only=False)
        summed = self.reduce_sums(outputs)
        if not self._all_finite(summed.get("loss", 0.0)):
            # A non-finite loss or gradient would poison the weights and Adam's moments for good: skip the step,
            # leaving both untouched (the next step zeroes the gradient buffers); the trainer counts the skips.
            summed.update(grad_norm=math.nan, update_skipped=1.0)
            return summed
        update_ok, grad_norm, _ = self.optimizer.step()
        summed["grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
        summed["update_skipped"] = float(not update_ok)
        return summed

    def _all_finite(self, loss: float) -> bool:
        """Collective: whether ``loss`` and every gradient are finite on every rank (all ranks get one answer).

        Every rank must reach the all-reduce whatever its own verdict: TP ranks can disagree (a NaN that only one
        rank's shard produced), and a rank that skipped the collective would leave the others waiting forever.
        """
        finite = math.isfinite(loss) and all(
            bool(torch.isfinite(grad).all())
            for p in self.model.parameters()
            if (grad := getattr(p, "main_grad", p.grad)) is not None
        )
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() == 0.0)

    def update(
        self,
        local: TokenBatch,
        batch: TokenBatch,
        loss_fn: LossFn,
        minibatches: int,
        epochs: int,
        lr: float | None = None,
    ) -> list[dict[str, float]]:
        """`epochs` passes of `minibatches` optimizer steps over this rank's share `local` of the global `batch`.

        Each step's loss is normalised by the token/sequence counts of its whole minibatch across DP ranks.
        """
        global_parts = [part.split(minibatches) for part in batch.split(self.layout.dp)]
        updates = []
        for _ in range(epochs):
            for index, minibatch in enumerate(local.split(minibatches)):
                tokens = sum(parts[index].num_tokens for parts in global_parts)
                sequences = sum(len(parts[index]) for parts in global_parts)
                updates.append(self.train_step(minibatch, loss_fn, tokens, sequences, lr=lr))
        return updates

    def reduce_sums(self, outputs: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum per-micro-batch metrics over micro-batches and DP ranks; every rank gets the result.

        Only last-stage ranks computed metrics; each TP rank of it holds the same values (logits are gathered),
        so summing over DP and then over the pipeline group (earlier stages add zeros) counts each once.
        """
        from megatron.core import parallel_state

        if isinstance(outputs, dict):
            outputs = [outputs] if outputs else []
        payload = [sorted(outputs[0]) if outputs else []]
        if self.layout.pp > 1:
            dist.broadcast_object_list(
                payload,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        names = payload[0]
        # names ending in "_max" are maxima (e.g. the largest importance weight) and reduce with MAX, the rest sum
        is_max = torch.tensor([n.endswith("_max") for n in names], dtype=torch.bool, device=self.device)
        values = torch.where(is_max, -math.inf, 0.0).to(torch.float64)
        if self.layout.is_last_stage:
            for out in outputs:
                row = torch.stack([out[n].to(self.device).double().reshape(()) for n in names]) if names else values
                values = torch.where(is_max, torch.maximum(values, row), values + row)
        sums = torch.where(is_max, 0.0, values).to(torch.float64)
        maxima = torch.where(is_max, values, -math.inf).to(torch.float64)
        groups = [parallel_state.get_data_parallel_group()]
        if self.layout.pp > 1:
            groups.append(parallel_state.get_pipeline_model_parallel_group())
        for group in groups:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        values = torch.where(is_max, maxima, sums)
        return dict(zip(names, values.tolist(), strict=True))

    def gather_hf_weights(
        self, dtype: torch.dtype = torch.bfloat16, dst: int | None = 0
    ) -> dict[str, torch.Tensor] | None:
        """Collective: the full policy as an HF state dict on rank ``dst`` (every rank with ``dst=None``)."""
        return gather_hf_state_dict(self.model.module, self.spec, self.layout, dst=dst, dtype=dtype)

    def save_checkpoint(
        self,
        directory: str,
        *,
        base_dir: str | Path | None = None,
        run_config: dict[str, Any] | None = None,
        step: int | None = None,
    ) -> None:
        """Collective: an atomic dist checkpoint that records what it holds (see ``learner/checkpoint.py``).

        ``base_dir`` is the HF folder the run started from (its config and tokenizer are copied into the
        checkpoint, so ``qrl-export`` needs nothing else); ``run_config`` the run's settings (``to_dict(cfg)``).
        """
        from dataclasses import asdict

        from qrl_megatron.learner.checkpoint import save_checkpoint

        meta = {
            "kind": "learner",
            "spec": asdict(self.spec),
            "params_dtype": str(self.params_dtype).removeprefix("torch."),
            "precision": self.cfg.precision,
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp},
            "base_model": str(Path(base_dir).resolve()) if base_dir is not None else None,
            "step": step,
            "run_config": run_config,
        }
        save_checkpoint(self.model, self.optimizer, directory, meta=meta, base_dir=base_dir)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Collective: weights and optimizer state from a dist checkpoint written at any TP/PP layout."""
        from qrl_megatron.learner.checkpoint import load_checkpoint

        return load_checkpoint(self.model, self.optimizer, directory)
