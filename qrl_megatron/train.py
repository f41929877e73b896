"""The RL loop. One step: rollout -> reward -> advantage -> learner logprobs -> loss/update -> weight sync.

Every rank of the learner world runs this function; rank 0 also owns the colocated vLLM engine and the logs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from qrl_megatron.algos.invariant_scaling import apply_invariant_scaling
from qrl_megatron.algos.policy_loss import grpo_loss
from qrl_megatron.bridge.base import make_weight_sync
from qrl_megatron.config import QRLConfig, to_dict
from qrl_megatron.data.loader import load_task
from qrl_megatron.evals.run import flat_metrics
from qrl_megatron.hf_export import export_policy, export_rollout_format
from qrl_megatron.learner.batch import TokenBatch
from qrl_megatron.learner.learner import Learner, scheduled_lr
from qrl_megatron.learner.memory import learner_memory
from qrl_megatron.learner.offload import offload_optimizer
from qrl_megatron.learner.resume import (
    PREEMPTED_MARKER,
    CheckpointStore,
    Preempted,
    PreemptionFlag,
    RunCheckpointer,
    RunStopped,
    plan_resume,
)
from qrl_megatron.learner.warmstart import run_warmstart
from qrl_megatron.lora.export import export_merged, write_peft_adapter
from qrl_megatron.metrics.logger import MetricsLogger
from qrl_megatron.models.base import load_hf_weights, load_tokenizer, prepare_base_model, sequence_length
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import destroy_distributed, init_distributed
from qrl_megatron.rewards import MATH_VERIFIER
from qrl_megatron.rewards.scorer import RewardScorer, verifier_name
from qrl_megatron.rollout.aqn import AdaptiveQuantizationNoise
from qrl_megatron.rollout.engine import EngineDied, LoRAServing
from qrl_megatron.rollout.engines import make_engine, rollout_model_dir
from qrl_megatron.rollout.stage import RolloutDriver, RolloutResult

T = TypeVar("T")


def _broadcast(obj: T | None) -> T:
    payload = [obj]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]  # type: ignore[return-value]


def train(cfg: QRLConfig) -> dict[str, Any] | None:
    preemption = PreemptionFlag()  # first: a signal that arrives during start-up is honoured at the first step
    from qrl_megatron.rollout.servers import connect_servers, run_transport

    # before any process or model: sync.transport=cuda_ipc / nccl on a machine without CUDA is a one-line error
    transport = run_transport(cfg.sync, cfg.rollout)
    rollout_cfg = cfg.rollout  # rank 0: with the URLs of rollout.server_urls / server_list once they are healthy
    check_device_settings(cfg, torch.cuda.is_available())  # GPU-only memory settings: one line, before any work
    layout = init_distributed(cfg.learner.tp, cfg.learner.pp, cfg.learner.dp, seed=cfg.seed)
    torch.set_num_threads(cfg.learner.threads or max(1, (os.cpu_count() or 1) // layout.world_size))
    # the launcher built the base model before the ranks started: a cache hit here
    base_dir = prepare_base_model(cfg.model, cfg.run.cache_dir)
    spec, tokenizer = load_spec(base_dir), load_tokenizer(base_dir)
    # rows math-verify cannot score, or whose prompt leaves no room for the completion, are skipped (and counted)
    task = load_task(
        cfg.task,
        cfg.seed,
        tokenizer,
        max_prompt_tokens=spec.max_position_embeddings - cfg.rollout.max_new_tokens,
        check_answers=verifier_name(cfg.reward, cfg.task.name) == MATH_VERIFIER,
        workers=cfg.reward.workers,
        verbose=layout.rank == 0,
    )
    seq_length = sequence_length(tokenizer, task, cfg.rollout.max_new_tokens, spec.max_position_embeddings)

    policy_dir = base_dir
    if cfg.warmstart.enabled and cfg.warmstart.steps > 0:
        base_weights = load_hf_weights(base_dir)
        settings = to_dict(cfg)
        policy_dir = run_warmstart(
            cfg.warmstart,
            cfg.learner,
            spec,
            layout,
            base_dir,
            base_weights,
            list(task["train"]),
            tokenizer,
            seq_length,
            seed=cfg.seed,
            cache_dir=cfg.run.cache_dir,
            provenance={"model": settings["model"], "task": settings["task"]},
            progress=cfg.run.progress,
        )
    # lazy: each learner rank reads only its own shard's slices from the files
    policy_weights: Mapping[str, torch.Tensor] = load_hf_weights(policy_dir)
    scaling = cfg.algo.invariant_scaling
    # QuRL invariant scaling, once, on the weights RL starts from -- for full-parameter quantized rollouts only: with
    # LoRA the base is frozen on purpose (and its NVFP4 codes come from the unscaled export the engine loads)
    if scaling.s != 1 and cfg.rollout.quant != "bf16" and not cfg.learner.lora.enabled:
        # the scaling rewrites whole tensors, so this path holds the full state dict (the lazy read does not)
        policy_weights = apply_invariant_scaling(dict(policy_weights), scaling.s, scaling.targets)
    lora = cfg.learner.lora.enabled
    engine_model_dir = None  # QeRL mode: the engine's base, exported once (its NVFP4 codes are the learner's base)
    if lora:
        if layout.rank == 0:
            engine_model_dir = str(rollout_model_dir(cfg.rollout, cfg.run.dir, policy_dir, None))
        engine_model_dir = _broadcast(engine_model_dir)
    learner = Learner(
        spec,
        layout,
        cfg.learner,
        policy_weights,
        cfg.learner.lr,
        seq_length,
        cfg.rollout.temperature,
        frozen_base=load_hf_weights(engine_model_dir)
        if engine_model_dir and cfg.learner.base_format == "nvfp4"
        else None,
        seed=cfg.seed,
    )
    reference = None  # the KL reference: a frozen copy of the policy RL starts from
    if cfg.algo.kl_coef > 0:
        reference = Learner(spec, layout, cfg.learner, policy_weights, 0.0, seq_length, cfg.rollout.temperature, False)
    sync = make_weight_sync(
        cfg.sync,
        spec,
        probe_sequences(task, tokenizer, cfg.sync.probe_sequences),
        learner_parallel=(cfg.learner.tp, cfg.learner.pp, cfg.learner.dp),
        rollout_format=cfg.rollout.quant,
        engine_tp=cfg.rollout.tp,
        adapter=cfg.learner.lora.adapter() if lora else None,
        send_norms=cfg.algo.aqn.enabled,  # the sync washes out AQN's noise on the engine's norms
    )
    # QeRL mode: the engine starts with the learner's initial adapter (B = 0: the base itself), as a PEFT folder
    initial_adapter = sync.gather(learner) if lora else None  # type: ignore[attr-defined]
    loss_fn = grpo_loss(cfg.algo, max_new_tokens=cfg.rollout.max_new_tokens)
    checkpoints = RunCheckpointer(
        CheckpointStore(Path(cfg.run.dir) / "checkpoints", cfg.trainer.keep_checkpoints), layout.rank
    )
    resume_from, resume_error = _broadcast(
        plan_resume(cfg.trainer.resume, checkpoints.store, to_dict(cfg)) if layout.rank == 0 else None
    )
    if resume_error:
        raise ValueError(resume_error)
    state = checkpoints.load(Path(resume_from), learner) if resume_from else {}
    if layout.rank == 0:
        (Path(cfg.run.dir) / PREEMPTED_MARKER).unlink(missing_ok=True)  # this run is the requeued one
    start_step, skipped = state.get("step", 0), state.get("skipped_in_a_row", 0)

    # rank 0 drives the engine and writes the logs; the other ranks are pure learner
    driver: RolloutDriver | None = None
    logger: MetricsLogger | None = None
    evals: dict[str, Any] = {}
    serving: LoRAServing | None = None

    def start_engine() -> Any:
        """Rank 0's engine: the policy in the rollout format (QeRL: the exported base + the initial adapter)."""
        return make_engine(
            rollout_cfg,
            cfg.run.dir,
            cfg.seed,
            policy_dir,
            seq_length,
            sync.plan,
            adapter=serving,
            model_dir=engine_model_dir,
            transport=transport,
            tcp=cfg.sync.tcp_options(),
        )

    if layout.rank == 0:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if lora:
            assert initial_adapter is not None
            serving = LoRAServing(
                cfg.learner.lora.adapter(),
                str(
                    write_peft_adapter(
                        {k: v for k, v in initial_adapter.items() if ".lora_" in k},
                        run_dir / "adapter_initial",
                        cfg.learner.lora.adapter(),
                        policy_dir,
                        spec,
                    )
                ),
            )
        rollout_cfg = connect_servers(cfg.rollout, lambda line: print(line, flush=True))  # waits for their health
        engine = start_engine()
        scorer = RewardScorer(cfg.reward, cfg.task.name)
        driver = RolloutDriver(
            engine, cfg.rollout, cfg.algo, task, seq_length, tokenizer.pad_token_id, cfg.seed, scorer, cfg.eval
        )
        logger = MetricsLogger(run_dir, cfg.run.tensorboard, cfg.run.progress, cfg.trainer.max_steps, start_step)
        if state:
            driver.sampler.load_state(state["sampler"])
            evals = state["evals"]
    # step-0 sync: the engine starts from exactly what the bridge streams (the learner's weights, rollout format)
    initial_sync = sync(learner, driver.engine if driver else None, 0)
    if driver:
        print("initial sync: " + ", ".join(f"{k}={v:.4g}" for k, v in initial_sync.items()), flush=True)
        if not state:
            evals["initial_sync"] = initial_sync
            evals["data"] = task.report  # rows used and skipped per split and reason
            evals["before"] = driver.evaluate(0)
        print(f"held-out greedy accuracy before RL: {evals['before']['accuracy']:.3f}", flush=True)
    aqn = AdaptiveQuantizationNoise(cfg.algo.aqn, cfg.trainer.max_steps, cfg.seed)
    # the first rollout is in AQN stage 0 (no noise); a resumed run re-applies the noise its last step drew
    aqn_sigma = aqn(driver.engine, start_step) if driver and start_step else 0.0

    def replace_engine() -> None:
        """Rank 0: a new engine for one that died (it holds the start-up weights until the next sync)."""
        if driver:
            try:
                driver.engine.close()
            except Exception as err:  # noqa: BLE001 -- a dead engine may fail to close; the new one matters
                print(f"closing the dead engine failed ({type(err).__name__}: {err}); starting a new one", flush=True)
            driver.engine = start_engine()

    def restart_engine(step: int) -> None:
        """A new engine for one that died, holding the learner's weights (and the noise AQN drew) as of ``step - 1``."""
        replace_engine()
        sync(learner, driver.engine if driver else None, step - 1)
        if driver:
            aqn(driver.engine, step - 1)

    def sync_step(step: int) -> dict[str, float]:
        """Collective: the weight sync of ``step``, retried on a new engine when the engine died during it (a death
        between the rollout and the sync, or in the sync, would otherwise end the run)."""
        for attempt in range(cfg.trainer.engine_restarts + 1):
            try:
                if driver:  # rollout.sleep_level: the engine's weights back (its KV cache wakes with the next generate)
                    driver.engine.reacquire_memory(["weights"])
                outcome: tuple[str, Any] = ("ok", sync(learner, driver.engine if driver else None, step))
            except EngineDied as err:
                outcome = ("died", str(err))
            status, payload = _broadcast(outcome if driver else None)
            if status == "ok":
                return outcome[1]
            if attempt < cfg.trainer.engine_restarts:
                if driver:
                    print(f"step {step}: {payload} during the weight sync; restarting the engine", flush=True)
                replace_engine()
        raise RunStopped(
            f"the rollout engine died {cfg.trainer.engine_restarts + 1} times in the weight sync of step {step} "
            f"({payload}); giving up (trainer.engine_restarts)"
        )

    rl_start, step = time.perf_counter(), start_step
    for step in range(start_step + 1, cfg.trainer.max_steps + 1):
        # rollout -> reward -> advantage on rank 0's engine; every rank takes its DP share of the batch (with
        # learner.offload_optimizer the optimizer's state waits in host memory meanwhile)
        offloaded = offload_optimizer(learner) if cfg.learner.offload_optimizer else None
        result = _rollout(driver, step, cfg.trainer.engine_restarts, restart_engine)
        if offloaded is not None:
            offloaded.restore()
        local = result.batch.split(layout.dp)[layout.dp_rank]

        # learner: proximal (old) logprobs of the full-precision policy, then the policy updates
        train_start = time.perf_counter()
        out = learner.logprobs(local)
        if out is not None:
            local.old_logprobs = out[0]
        ref_out = reference.logprobs(local) if reference is not None else None
        if ref_out is not None:
            local.ref_logprobs = ref_out[0]
        mismatch = learner.reduce_sums(_mismatch_sums(local, out))
        lr = scheduled_lr(
            cfg.learner.lr,
            step,
            cfg.trainer.max_steps,
            cfg.learner.lr_warmup_steps,
            cfg.learner.lr_schedule,
            cfg.learner.lr_min_ratio,
        )
        updates = learner.update(local, result.batch, loss_fn, cfg.algo.minibatches, cfg.algo.epochs, lr=lr)
        train_seconds = time.perf_counter() - train_start
        skipped = skipped + 1 if any(u["update_skipped"] for u in updates) else 0
        if skipped >= cfg.trainer.max_skipped_steps:
            raise RunStopped(
                f"{skipped} steps in a row had a non-finite loss or gradient (updates skipped, weights untouched) "
                f"at step {step}: the run diverged; lower learner.lr or check the rewards (trainer.max_skipped_steps)"
            )

        # weight sync: learner -> engine, in place
        sync_metrics = sync_step(step)

        if driver and logger:
            metrics = _step_metrics(result.metrics, mismatch, updates, train_seconds, sync_metrics)
            metrics.update(lr=lr, updates_skipped=sum(u["update_skipped"] for u in updates), skipped_in_a_row=skipped)
            metrics.update(driver.engine.step_metrics())  # rollout.engines > 1: tokens/s, sync s and bytes per engine
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                metrics.update(flat_metrics(driver.evaluate(step)))  # eval_accuracy, eval/<set>/pass@k, ...
            if step == start_step + 1:  # the data accounting, once: data/<split>/skipped_<reason>
                metrics.update({f"data/{k}/{m}": float(v) for k, r in task.report.items() for m, v in r.items()})
            if step == 1:  # rank 0's bytes of base weights, adapter, gradients, optimizer state (Adam's now exists)
                evals["learner_memory"] = learner_memory(learner)  # a resumed run keeps its first step's figures
                metrics.update({f"memory/{k}_bytes": float(v) for k, v in evals["learner_memory"].items()})
            # QeRL AQN: noise on the engine's RMSNorm weights for the next rollout (the sync restored clean ones;
            # the probe and the evaluation above saw the clean policy)
            metrics["aqn_sigma"], aqn_sigma = aqn_sigma, aqn(driver.engine, step)
            logger.log(step, metrics)
        out_of_time = bool(cfg.trainer.max_time_s) and time.perf_counter() - rl_start > cfg.trainer.max_time_s
        preempted, out_of_time = _broadcast((preemption.requested, out_of_time) if driver else None)
        if (cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or preempted:
            run_state = {"sampler": driver.sampler.state(), "evals": evals} if driver else None
            checkpoints.save(
                step, learner, {**(run_state or {}), "skipped_in_a_row": skipped, "settings": to_dict(cfg)}
            )
        if preempted:  # Slurm's --signal / scancel: the checkpoint is written; the sbatch script requeues
            if driver and logger:
                logger.close()
                driver.engine.close()
                (Path(cfg.run.dir) / PREEMPTED_MARKER).write_text(json.dumps({"step": step}))
            raise Preempted(step)
        if out_of_time:
            break

    rl_seconds = time.perf_counter() - rl_start
    if cfg.trainer.checkpoint:  # records the base folder's config/tokenizer and the run config (qrl-export reads it)
        learner.save_checkpoint(
            str(Path(cfg.run.dir) / "checkpoint"), base_dir=base_dir, run_config=to_dict(cfg), step=step
        )
    # the trained policy as a complete HF folder (config, tokenizer, sharded safetensors in the base's dtype),
    # streamed tensor by tensor to rank 0's writer; transformers, vLLM and bench/ablation.py load it
    if lora:  # the PEFT adapter, and base + adapter merged into a bf16 HF folder
        final = export_lora(learner, sync, cfg, layout.rank == 0, policy_dir, engine_model_dir)
    else:
        final = export_policy(learner.model, spec, layout, Path(cfg.run.dir) / "final", base_dir)
    if layout.rank == 0:
        for fmt in cfg.run.export_formats:  # quantized copies for serving, from the folder just written
            export_rollout_format(final, Path(cfg.run.dir) / f"final-{fmt}", fmt)
    if driver and logger:
        evals["after"] = driver.evaluate(step)
        evals.update(rl_seconds=rl_seconds, steps=step, policy=str(policy_dir))
        evals["improvement"] = evals["after"]["accuracy"] - evals["before"]["accuracy"]
        (Path(cfg.run.dir) / "eval.json").write_text(json.dumps(evals, indent=2))
        print(
            f"held-out greedy accuracy: {evals['before']['accuracy']:.3f} -> {evals['after']['accuracy']:.3f} "
            f"({step} steps, {rl_seconds:.0f} s of RL); outputs in {cfg.run.dir}",
            flush=True,
        )
        logger.close()
        driver.close()
        driver.engine.close()
    dist.barrier()
    destroy_distributed()
    return evals or None


def export_lora(
    learner: Learner, sync: Any, cfg: QRLConfig, is_dst: bool, policy_dir: Path, engine_model_dir: str | None
) -> Path:
    """Collective: ``run.dir/adapter`` (PEFT, on the base RL started from) and ``run.dir/final`` (merged, bf16)."""
    tensors = sync.gather(learner)
    final = Path(cfg.run.dir) / "final"
    if is_dst:
        assert tensors is not None
        adapter = cfg.learner.lora.adapter()
        lora_tensors = {k: v for k, v in tensors.items() if ".lora_" in k}
        norms = {k: v for k, v in tensors.items() if ".lora_" not in k} if adapter.train_norms else None
        write_peft_adapter(lora_tensors, Path(cfg.run.dir) / "adapter", adapter, policy_dir, learner.spec)
        nvfp4 = cfg.learner.base_format == "nvfp4"
        base = engine_model_dir if nvfp4 and engine_model_dir else policy_dir
        export_merged(base, final, lora_tensors, adapter, norms, base_format=cfg.learner.base_format)
    dist.barrier()
    return final


def _rollout(
    driver: RolloutDriver | None, step: int, restarts: int, restart_engine: Callable[[int], None]
) -> RolloutResult:
    """Collective: rank 0's rollout of ``step``, retried on a restarted engine when the engine died.

    The prompt stream is rewound before a retry and sampling is seeded per step, so the retried step samples
    exactly what the lost attempt would have: a run that lost its engine ends where an unbroken one does.
    """
    for attempt in range(restarts + 1):
        position = driver.sampler.state() if driver else None
        try:
            outcome: tuple[str, Any] | None = None
            if driver:
                outcome = ("ok", driver.rollout(step))
                driver.engine.release_memory()  # rollout.sleep_level: the learner phase gets the engine's memory
        except EngineDied as err:
            outcome = ("died", str(err))
        status, payload = _broadcast(outcome)
        if status == "ok":
            return payload
        if attempt == restarts:
            break
        if driver and position is not None:
            print(f"step {step}: {payload}; restarting the engine ({attempt + 1}/{restarts})", flush=True)
            driver.sampler.load_state(position)
        restart_engine(step)  # collective: every rank streams the weights into the new engine
    raise RunStopped(
        f"the rollout engine died {restarts + 1} times at step {step} ({payload}); giving up (trainer.engine_restarts)"
    )


def check_device_settings(cfg: QRLConfig, cuda: bool) -> None:
    """The memory settings that need a GPU (or exclude each other), against this machine: a ConfigError naming the
    key and the fix, raised before any process or model starts."""
    from qrl_megatron.config import ConfigError

    cfg.rollout.check_device(cuda)
    if cfg.rollout.sleep_level == 2 and cfg.learner.lora.enabled:
        raise ConfigError(
            "rollout.sleep_level=2 drops the engine's weights, and with learner.lora.rank > 0 the base is never "
            "streamed again (only the adapter); use rollout.sleep_level=1"
        )
    if cfg.learner.offload_optimizer and not cuda:
        raise ConfigError(
            "learner.offload_optimizer=true moves the optimizer state from the GPU to host memory, and this machine "
            "has no CUDA (the state is in host memory already); set learner.offload_optimizer=false"
        )


def probe_sequences(task: Any, tokenizer: Any, count: int) -> list[list[int]]:
    """Fixed held-out prompt + answer token sequences (the first `count`) for the bridge's logprob probe."""
    rows = list(task["eval"])[:count]
    return [list(tokenizer(row["prompt"] + row["answer"])["input_ids"]) for row in rows]


def _mismatch_sums(local: TokenBatch, out: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Sums (and maxima) comparing the learner's proximal logprobs with the engine's, on sampled tokens.

    With r = pi_old / pi_q on tokens sampled from the engine pi_q: E_q[r log r] estimates KL(pi_old || pi_q) and
    E_q[r - 1 - log r] (k3) estimates KL(pi_q || pi_old). Only the last pipeline stage has logprobs.
    """
    if out is None:
        return {}
    logp, entropy = out
    mask = local.loss_mask
    log_ratio = (logp - local.rollout_logprobs) * mask
    ratio = torch.exp(log_ratio)
    return {
        "logprob_diff_abs_sum": (log_ratio.abs() * mask).sum(),
        "logprob_diff_abs_max": (log_ratio.abs() * mask).max() if mask.any() else torch.zeros(()),
        "kl_old_q_sum": (ratio * log_ratio * mask).sum(),
        "kl_q_old_sum": ((ratio - 1 - log_ratio) * mask).sum(),
        "rollout_entropy_sum": (-local.rollout_logprobs * mask).sum(),
        "entropy_sum": (entropy * mask).sum(),
        "tokens": mask.sum(),
    }


def _step_metrics(
    rollout_metrics: dict[str, float],
    probe: dict[str, float],
    updates: list[dict[str, float]],
    train_seconds: float,
    sync_metrics: dict[str, float],
) -> dict[str, float]:
    tokens = max(probe.get("tokens", 0.0), 1.0)
    update_tokens = max(sum(u["tokens"] for u in updates), 1.0)
    metrics = dict(rollout_metrics)
    metrics.update(
        time_train_s=train_seconds,
        logprob_diff_abs_mean=probe.get("logprob_diff_abs_sum", 0.0) / tokens,
        logprob_diff_abs_max=probe.get("logprob_diff_abs_max", 0.0),
        mismatch_kl=probe.get("kl_old_q_sum", 0.0) / tokens,
        mismatch_kl_k3=probe.get("kl_q_old_sum", 0.0) / tokens,
        entropy=probe.get("entropy_sum", 0.0) / tokens,
        rollout_entropy=probe.get("rollout_entropy_sum", 0.0) / tokens,
        loss=sum(u["loss"] for u in updates) / len(updates),
        grad_norm=updates[-1]["grad_norm"],
        clip_fraction=sum(u["clipped_tokens"] for u in updates) / update_tokens,
        masked_fraction=sum(u.get("masked_tokens", 0.0) for u in updates) / update_tokens,
        is_weight_mean=sum(u.get("is_weight_sum", 0.0) for u in updates) / update_tokens,
        is_weight_max=max(u.get("is_weight_max", 0.0) for u in updates),
        **sync_metrics,
    )
    metrics["time_step_s"] = metrics["time_rollout_s"] + train_seconds + metrics.get("sync_seconds", 0.0)
    return metrics
