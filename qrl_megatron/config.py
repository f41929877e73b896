"""One typed config tree for the whole trainer.

Each component owns a dataclass; `QRLConfig` is the OmegaConf structured root. YAML recipes in `configs/` are merged
onto it, then `key=value` dotlist overrides. Every field carries a one-line doc in its metadata (shown by
`qrl-train --help-config`); every check raises `ConfigError` (a `ValueError`) that names the dotted key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key and the fix."""


def doc(default: Any = MISSING, text: str = "", factory: Any = MISSING) -> Any:
    """A dataclass field with a one-line doc."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            + _closest(str(value), [str(a) for a in allowed])
        )


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} must lie in [{low}, {high}]")


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    dir: str = doc("runs/tiny-grpo", "output folder: metrics.jsonl, eval.json, TensorBoard events, checkpoint")
    cache_dir: str = doc(".cache/qrl", "cache for locally built models and warm-start policies (shared by runs)")
    progress: bool = doc(True, "live one-line progress display on stderr")
    tensorboard: bool = doc(True, "write TensorBoard events under run.dir/tb")
    on_existing: str = doc("archive", "run.dir already holds a run: archive (move it to <dir>.<time>) or error")

    def validate(self, prefix: str = "run") -> None:
        if not self.dir:
            raise ConfigError(f"{prefix}.dir must be a folder path")
        check_choice(f"{prefix}.on_existing", self.on_existing, ("archive", "error"))


@dataclass
class TinyModelOptions:
    hidden_size: int = doc(128, "hidden size of the locally built tiny Qwen2 model")
    num_layers: int = doc(4, "transformer layers")
    num_attention_heads: int = doc(4, "query heads (head_dim = hidden_size / heads)")
    num_query_groups: int = doc(2, "key/value heads (GQA groups)")
    ffn_hidden_size: int = doc(352, "SwiGLU intermediate size")
    vocab_size: int = doc(64, "padded character vocabulary size (multiple of 8)")
    max_position_embeddings: int = doc(128, "longest sequence (prompt + completion)")

    def validate(self, prefix: str) -> None:
        for f in fields(self):
            check_positive(f"{prefix}.{f.name}", getattr(self, f.name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{prefix}.hidden_size must be divisible by {prefix}.num_attention_heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"{prefix}.num_attention_heads must be divisible by {prefix}.num_query_groups")
        if self.vocab_size % 8:
            raise ConfigError(f"{prefix}.vocab_size={self.vocab_size} must be a multiple of 8")


@dataclass
class ModelConfig:
    source: str = doc("tiny", "'tiny' builds the tiny Qwen2 model locally; else a local HF model folder")
    tiny: TinyModelOptions = doc(text="shape of the tiny model (used when source=tiny)", factory=TinyModelOptions)
    init_seed: int = doc(0, "seed of the tiny model's random init")

    def validate(self, prefix: str = "model") -> None:
        if self.source != "tiny" and not Path(self.source).is_dir():
            raise ConfigError(f"{prefix}.source={self.source!r}: not 'tiny' and not an existing local model folder")
        self.tiny.validate(f"{prefix}.tiny")


@dataclass
class TaskConfig:
    name: str = doc("arithmetic", "verifiable task: 'arithmetic' (synthetic) or 'files' (task.data_files)")
    operations: str = doc("+", "arithmetic operators to draw from, a subset of '+-*'")
    min_digits: int = doc(1, "fewest digits per operand")
    max_digits: int = doc(2, "most digits per operand")
    num_train: int = doc(4000, "training problems")
    num_eval: int = doc(200, "held-out evaluation problems (disjoint from training)")
    data_files: str = doc("", "task=files: a local .json/.jsonl/.parquet file with 'prompt' and 'answer' columns")
    eval_files: str = doc("", "task=files: optional held-out file; default: the last task.num_eval rows")

    def validate(self, prefix: str = "task") -> None:
        check_choice(f"{prefix}.name", self.name, ("arithmetic", "files"))
        bad = set(self.operations) - set("+-*")
        if not self.operations or bad:
            raise ConfigError(f"{prefix}.operations={self.operations!r} must be a non-empty subset of '+-*'")
        check_range(f"{prefix}.min_digits", self.min_digits, 1, 6)
        check_range(f"{prefix}.max_digits", self.max_digits, self.min_digits, 6)
        check_positive(f"{prefix}.num_train", self.num_train)
        check_positive(f"{prefix}.num_eval", self.num_eval)
        if self.name == "files" and not self.data_files:
            raise ConfigError(f"{prefix}.data_files must name a file when {prefix}.name=files")


@dataclass
class WarmStartConfig:
    enabled: bool = doc(True, "supervised warm-start on the task before RL (cached under run.cache_dir)")
    steps: int = doc(300, "optimizer steps of the warm-start")
    batch_size: int = doc(64, "sequences per warm-start step (global)")
    lr: float = doc(3e-3, "warm-start learning rate (AdamW, cosine to 10%)")

    def validate(self, prefix: str = "warmstart") -> None:
        check_positive(f"{prefix}.steps", self.steps, allow_zero=True)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        check_positive(f"{prefix}.lr", self.lr)


@dataclass
class LearnerConfig:
    tp: int = doc(1, "tensor-parallel size of the Megatron learner")
    pp: int = doc(1, "pipeline-parallel size")
    dp: int = doc(1, "data-parallel size (world size = tp * pp * dp)")
    precision: str = doc(
        "fp32",
        "learner precision: fp32, bf16, or fp8/nvfp4 = fake-quantized compute on CPU, TE recipes on GPU "
        "(master weights stay in fp32)",
    )
    lr: float = doc(1e-4, "RL learning rate (AdamW), reached after learner.lr_warmup_steps")
    lr_warmup_steps: int = doc(10, "linear warm-up of the RL learning rate (Adam's first steps are sign-like)")
    lr_schedule: str = doc(
        "cosine", "after warm-up: constant, or cosine decay to lr * lr_min_ratio at trainer.max_steps"
    )
    lr_min_ratio: float = doc(0.1, "final learning rate of the cosine schedule, as a fraction of learner.lr")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    adam_beta2: float = doc(0.99, "AdamW beta2")
    grad_clip: float = doc(1.0, "global gradient-norm clip (0 = off)")
    micro_batch_size: int = doc(32, "sequences per micro-batch on one DP rank")
    distributed_optimizer: bool = doc(False, "shard optimizer state over DP (Megatron DistributedOptimizer)")
    threads: int = doc(0, "torch threads per learner process (0 = cores / processes)")

    def validate(self, prefix: str = "learner") -> None:
        for key in ("tp", "pp", "dp", "micro_batch_size"):
            check_positive(f"{prefix}.{key}", getattr(self, key))
        check_choice(f"{prefix}.precision", self.precision, ("fp32", "bf16", "fp8", "nvfp4"))
        check_positive(f"{prefix}.lr", self.lr)
        check_positive(f"{prefix}.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        check_choice(f"{prefix}.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_range(f"{prefix}.lr_min_ratio", self.lr_min_ratio, 0.0, 1.0)
        check_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        check_range(f"{prefix}.adam_beta2", self.adam_beta2, 0.0, 0.99999)
        check_positive(f"{prefix}.grad_clip", self.grad_clip, allow_zero=True)
        check_positive(f"{prefix}.threads", self.threads, allow_zero=True)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


ROLLOUT_QUANT_FORMATS = ("bf16", "nvfp4", "fp8", "int8")


@dataclass
class RolloutConfig:
    quant: str = doc(
        "bf16", "number format of the engine's linear weights: bf16, nvfp4 (W4A16), fp8 (W8A8 per channel), int8 (W8A8)"
    )
    engine: str = doc("colocated", "colocated: vLLM in the trainer's process tree; server: a `vllm serve` over HTTP")
    server_url: str = doc("", "engine=server: URL of a running `vllm serve` (empty: start one on loopback)")
    tp: int = doc(1, "tensor-parallel size of the vLLM engine (it reshards the full tensors the bridge sends)")
    prompts_per_step: int = doc(32, "prompts per RL step")
    samples_per_prompt: int = doc(8, "completions per prompt (the GRPO group size)")
    max_new_tokens: int = doc(8, "longest completion in tokens")
    temperature: float = doc(1.0, "sampling temperature (rollout logprobs are of this processed distribution)")
    top_p: float = doc(1.0, "nucleus sampling mass")
    kv_cache_mib: int = doc(256, "KV-cache memory of the engine in MiB (on CPU: host RAM)")
    enforce_eager: bool = doc(True, "skip graph compilation in vLLM (faster start on CPU)")

    def validate(self, prefix: str = "rollout") -> None:
        check_choice(f"{prefix}.quant", self.quant, ROLLOUT_QUANT_FORMATS)
        check_choice(f"{prefix}.engine", self.engine, ("colocated", "server"))
        check_positive(f"{prefix}.tp", self.tp)
        if self.server_url and not self.server_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}.server_url must start with http:// or https://, got {self.server_url!r}")
        check_positive(f"{prefix}.prompts_per_step", self.prompts_per_step)
        check_positive(f"{prefix}.samples_per_prompt", self.samples_per_prompt)
        check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        check_positive(f"{prefix}.temperature", self.temperature)
        check_range(f"{prefix}.top_p", self.top_p, 1e-6, 1.0)
        check_positive(f"{prefix}.kv_cache_mib", self.kv_cache_mib)


@dataclass
class InvariantScalingConfig:
    s: float = doc(
        1.5, "q/k/v (gate/up) weights / s, preceding RMSNorm * s, once before RL; quantized rollout only; 1 = off"
    )
    targets: list[str] = doc(
        text="linears to scale: qkv (q/k/v_proj, input_layernorm) and/or gate_up (gate/up_proj, post-attention norm)",
        factory=lambda: ["qkv"],
    )

    def validate(self, prefix: str = "algo.invariant_scaling") -> None:
        check_positive(f"{prefix}.s", self.s)
        if not self.targets:
            raise ConfigError(f"{prefix}.targets must name at least one of qkv, gate_up")
        for i, target in enumerate(self.targets):
            check_choice(f"{prefix}.targets[{i}]", target, ("qkv", "gate_up"))


@dataclass
class AQNConfig:
    enabled: bool = doc(False, "QeRL adaptive quantization noise on the rollout engine's decoder-layer RMSNorm weights")
    sigma_start: float = doc(1e-2, "noise std of the first noisy stage (QeRL paper: 1e-2)")
    sigma_end: float = doc(5e-4, "noise std of the last stage, geometric in between (QeRL paper: 5e-4, scripts: 1e-4)")
    stages: int = doc(10, "K equal stages over trainer.max_steps; stage 0 has no noise (QeRL: 10)")

    def validate(self, prefix: str = "algo.aqn") -> None:
        check_positive(f"{prefix}.sigma_start", self.sigma_start)
        check_positive(f"{prefix}.sigma_end", self.sigma_end)
        if self.stages < 2:
            raise ConfigError(f"{prefix}.stages={self.stages} must be >= 2 (stage 0 has no noise)")


@dataclass
class AlgoConfig:
    advantage: str = doc("grpo", "grpo: (r - mean) / (std + eps) per group; drgrpo: r - mean (Dr. GRPO)")
    std_eps: float = doc(1e-6, "epsilon added to the group reward std")
    clip_low: float = doc(0.2, "PPO ratio clip below: 1 - clip_low")
    clip_high: float = doc(0.2, "PPO ratio clip above: 1 + clip_high (DAPO clip-higher: 0.28)")
    loss_agg: str = doc(
        "token_mean",
        "loss aggregation: token_mean, seq_mean or seq_sum_norm (loss sum / (sequences * loss_norm_tokens))",
    )
    loss_norm_tokens: int = doc(0, "per-sequence token budget of seq_sum_norm (0: rollout.max_new_tokens)")
    correction: str = doc("none", "rollout correction for the quantized engine: none, tis, mis or acr (QuRL)")
    correction_level: str = doc("token", "IS ratio level: token, sequence (tis, mis) or geometric (mis only)")
    correction_cap: float = doc(2.0, "C: tis/acr weight min(r, C); mis keeps r in [1/C, C] (geometric: use ~1.001)")
    kl_coef: float = doc(0.0, "weight of the per-token KL to the reference policy (0: off)")
    kl_estimator: str = doc("k1", "KL estimator: k1 (logp - ref_logp) or k3 (exp(d) - d - 1 with d = ref_logp - logp)")
    entropy_coef: float = doc(0.0, "weight of the entropy bonus subtracted from the loss (0: off)")
    overlong_buffer: int = doc(0, "DAPO overlong shaping: penalty ramps over the last N tokens (0: off)")
    overlong_penalty: float = doc(1.0, "DAPO overlong shaping: reward penalty at rollout.max_new_tokens tokens")
    mask_truncated: bool = doc(False, "drop completions cut at rollout.max_new_tokens from the loss (loss mask 0)")
    dynamic_sampling: bool = doc(False, "DAPO dynamic sampling: drop groups whose rewards are all equal, refill")
    dynamic_sampling_max_attempts: int = doc(4, "most rollout rounds per step when refilling dropped groups")
    minibatches: int = doc(1, "policy updates per rollout batch (the batch is split into this many)")
    epochs: int = doc(1, "passes over the rollout batch")
    aqn: AQNConfig = doc(text="QeRL adaptive quantization noise (AQN) in the rollout engine", factory=AQNConfig)
    invariant_scaling: InvariantScalingConfig = doc(
        text="QuRL invariant scaling of the policy weights before RL", factory=InvariantScalingConfig
    )

    def validate(self, prefix: str = "algo") -> None:
        check_choice(f"{prefix}.advantage", self.advantage, ("grpo", "drgrpo"))
        check_positive(f"{prefix}.std_eps", self.std_eps)
        check_range(f"{prefix}.clip_low", self.clip_low, 0.0, 1.0)
        check_positive(f"{prefix}.clip_high", self.clip_high)
        check_choice(f"{prefix}.loss_agg", self.loss_agg, ("token_mean", "seq_mean", "seq_sum_norm"))
        check_positive(f"{prefix}.loss_norm_tokens", self.loss_norm_tokens, allow_zero=True)
        check_choice(f"{prefix}.correction", self.correction, ("none", "tis", "mis", "acr"))
        levels = {"tis": ("token", "sequence"), "acr": ("token",)}  # none ignores the level
        check_choice(
            f"{prefix}.correction_level",
            self.correction_level,
            levels.get(self.correction, ("token", "sequence", "geometric")),
        )
        if not self.correction_cap > 1.0:
            raise ConfigError(f"{prefix}.correction_cap={self.correction_cap} must be > 1")
        check_positive(f"{prefix}.kl_coef", self.kl_coef, allow_zero=True)
        check_choice(f"{prefix}.kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_positive(f"{prefix}.entropy_coef", self.entropy_coef, allow_zero=True)
        check_positive(f"{prefix}.overlong_buffer", self.overlong_buffer, allow_zero=True)
        check_positive(f"{prefix}.overlong_penalty", self.overlong_penalty, allow_zero=True)
        check_positive(f"{prefix}.dynamic_sampling_max_attempts", self.dynamic_sampling_max_attempts)
        check_positive(f"{prefix}.minibatches", self.minibatches)
        check_positive(f"{prefix}.epochs", self.epochs)
        self.aqn.validate(f"{prefix}.aqn")
        self.invariant_scaling.validate(f"{prefix}.invariant_scaling")


@dataclass
class SyncConfig:
    method: str = doc("bridge", "bridge: plan -> gather/quantize -> bucketed stream -> verify; full: bf16 v0 reload")
    bucket_mib: float = doc(64.0, "largest bucket streamed at once in MiB (bounds the extra memory of a sync)")
    exclude: list[str] = doc(
        text="regexes on HF names of linears kept in bf16 (embeddings, lm_head, norms and biases always are)",
        factory=list,
    )
    verify_checksums: bool = doc(True, "engine checks a CRC-32 of every received tensor before loading it")
    probe_every: int = doc(10, "logprob probe (engine vs dequantized reference forward) every N syncs (0: off)")
    probe_tolerance: float = doc(
        0.0, "largest allowed mean probe |logprob gap| in nats (0: 0.05 for bf16/nvfp4, 0.1 for the W8A8 fp8/int8)"
    )
    probe_sequences: int = doc(4, "held-out prompt+answer sequences the probe scores")

    def validate(self, prefix: str = "sync") -> None:
        import re

        check_choice(f"{prefix}.method", self.method, ("bridge", "full"))
        check_positive(f"{prefix}.bucket_mib", self.bucket_mib)
        for i, pattern in enumerate(self.exclude):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    f"{prefix}.exclude[{i}] = {pattern!r} is not a valid regular expression: {e}"
                ) from None
        check_positive(f"{prefix}.probe_every", self.probe_every, allow_zero=True)
        check_positive(f"{prefix}.probe_tolerance", self.probe_tolerance, allow_zero=True)
        check_positive(f"{prefix}.probe_sequences", self.probe_sequences)


@dataclass
class TrainerConfig:
    max_steps: int = doc(60, "RL steps")
    eval_every: int = doc(0, "held-out greedy evaluation every N steps (0: only before and after RL)")
    max_time_s: float = doc(0.0, "stop the RL phase after this many seconds (0 = no limit)")
    checkpoint: bool = doc(True, "write a Megatron dist checkpoint to run.dir/checkpoint at the end")

    def validate(self, prefix: str = "trainer") -> None:
        check_positive(f"{prefix}.max_steps", self.max_steps, allow_zero=True)
        check_positive(f"{prefix}.eval_every", self.eval_every, allow_zero=True)
        check_positive(f"{prefix}.max_time_s", self.max_time_s, allow_zero=True)


@dataclass
class QRLConfig:
    seed: int = doc(0, "seed of data, sampling and initialisation")
    run: RunConfig = doc(text="outputs and logging", factory=RunConfig)
    model: ModelConfig = doc(text="which model", factory=ModelConfig)
    task: TaskConfig = doc(text="the verifiable task", factory=TaskConfig)
    warmstart: WarmStartConfig = doc(text="supervised warm-start before RL", factory=WarmStartConfig)
    learner: LearnerConfig = doc(text="Megatron learner", factory=LearnerConfig)
    rollout: RolloutConfig = doc(text="vLLM rollout engine", factory=RolloutConfig)
    algo: AlgoConfig = doc(text="advantages and policy loss", factory=AlgoConfig)
    sync: SyncConfig = doc(text="learner -> engine weight sync", factory=SyncConfig)
    trainer: TrainerConfig = doc(text="the RL loop", factory=TrainerConfig)

    def validate(self) -> QRLConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value) and not isinstance(value, type):
                value.validate(f.name)  # type: ignore[attr-defined]
        batch = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        per_update = self.learner.dp * self.algo.minibatches
        if batch % per_update:
            raise ConfigError(
                f"rollout.prompts_per_step * rollout.samples_per_prompt = {batch} must be divisible by "
                f"learner.dp * algo.minibatches = {per_update}"
            )
        per_rank = batch // per_update
        if per_rank % self.learner.micro_batch_size and self.learner.micro_batch_size < per_rank:
            raise ConfigError(
                f"learner.micro_batch_size={self.learner.micro_batch_size} must divide the {per_rank} sequences "
                f"each DP rank gets per update"
            )
        if self.algo.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(
                f"algo.overlong_buffer={self.algo.overlong_buffer} must be smaller than "
                f"rollout.max_new_tokens={self.rollout.max_new_tokens}"
            )
        if self.warmstart.batch_size % self.learner.dp:
            raise ConfigError(f"warmstart.batch_size must be divisible by learner.dp={self.learner.dp}")
        warm_per_rank = self.warmstart.batch_size // self.learner.dp
        if warm_per_rank % self.learner.micro_batch_size and self.learner.micro_batch_size < warm_per_rank:
            raise ConfigError(
                f"learner.micro_batch_size={self.learner.micro_batch_size} must divide the {warm_per_rank} warm-start "
                "sequences each DP rank gets (warmstart.batch_size / learner.dp)"
            )
        return self


# ---------------------------------------------------------------------------------------------------------------
def _known_keys(path: list[str]) -> list[str]:
    """Field names of the config node at `path` (for 'did you mean' suggestions)."""
    node: Any = QRLConfig()
    for part in path:
        node = getattr(node, part, None)
        if not is_dataclass(node):
            return []
    return [f.name for f in fields(node)]


def _translate(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key:
        *parents, leaf = key.split(".")
        match = difflib.get_close_matches(leaf, _known_keys(parents), n=1, cutoff=0.5)
        suggestion = f" (did you mean '{'.'.join([*parents, match[0]])}'?)" if match else ""
        return ConfigError(f"unknown config key '{key}'{suggestion}")
    if isinstance(err, ValidationError) and key:
        first = str(err).splitlines()[0]
        return ConfigError(f"bad value for '{key}': {first}")
    return ConfigError(str(err).splitlines()[0])


_DOTLIST_RE = re.compile(r"^[A-Za-z_][\w.]*=")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> QRLConfig:
    """Merge a YAML recipe and `key=value` overrides onto the typed defaults, validate, return the dataclass."""
    schema = OmegaConf.structured(QRLConfig)
    try:
        merged: DictConfig = schema
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(
                    f"config file {str(p)!r} not found (recipes live in configs/, e.g. configs/tiny_cpu.yaml)"
                )
            loaded = OmegaConf.load(p)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
            merged = OmegaConf.merge(merged, loaded)  # type: ignore[assignment]
        for item in overrides:
            if not _DOTLIST_RE.match(item):
                raise ConfigError(f"override {item!r} must look like key=value (e.g. learner.tp=2)")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))  # type: ignore[assignment]
        cfg: QRLConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _translate(err) from None
    return cfg.validate()


def to_yaml(cfg: QRLConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: QRLConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def describe(cls: type = QRLConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line doc) for every leaf field: the config reference."""
    rows: list[tuple[str, Any, str]] = []
    instance = cls()
    for f in fields(cls):
        value = getattr(instance, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            rows.extend(describe(type(value), key + "."))
        else:
            rows.append((key, value, f.metadata.get("doc", "")))
    return rows


def reference_markdown() -> str:
    """docs/config.md: every key, its default and its doc (tests check the file is current)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m qrl_megatron.config > docs/config.md`; every key can be set in a YAML recipe or as",
        "a `key=value` override on the `qrl-train` command line.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{key}` | `{default!r}` | {text} |" for key, default, text in describe()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
