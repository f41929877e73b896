"""Methods mixed into every vLLM worker (`worker_extension_cls`), called by name through `collective_rpc`.

Called by name rather than as pickled functions so no insecure serialization is needed (vLLM refuses pickled
callables unless VLLM_ALLOW_INSECURE_SERIALIZATION=1).
"""

from __future__ import annotations

from typing import Any


class QRLWorkerExtension:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def qrl_parameter_checksums(self) -> dict[str, float]:
        """float64 sum of every engine parameter (vLLM names): a cheap fingerprint of what the engine holds."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}

    def qrl_add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]:
        """QeRL AQN: add N(0, sigma^2) to the weight of every decoder-layer RMSNorm, in place (see rollout/aqn.py).

        Targets vLLM's ``RMSNorm`` modules named ``layers.<i>.input_layernorm`` / ``post_attention_layernorm`` (the
        norms feeding q/k/v and gate/up, as in QeRL's Fig. 6); the final norm and per-head q/k norms stay clean.
        The noise is drawn on CPU from (seed, module name), so every TP rank adds the same tensor to its replica.
        vLLM's RMSNorm reads ``self.weight.data`` on every forward (no packed copy, unlike the tied lm_head), so
        the in-place update takes effect at once; the caller must drop cached prefixes. The next weight sync
        overwrites the norms with the learner's clean ones.
        """
        from vllm.model_executor.layers.layernorm import RMSNorm

        from qrl_megatron.rollout.aqn import AQN_NORM_PATTERN, add_norm_noise

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        norms = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, RMSNorm) and m.has_weight and AQN_NORM_PATTERN.search(name)
        ]
        return add_norm_noise(norms, sigma, seed)

    def qrl_load_adapter(self, info: dict[str, Any]) -> dict[str, Any]:
        """QeRL adapter-only sync: verify, validate and swap in the LoRA adapter bucket ``info`` describes, in
        memory, keeping the previous adapter on any failure (rollout/lora_swap.py)."""
        from qrl_megatron.rollout.lora_swap import load_adapter

        return load_adapter(self, info)

    def qrl_reinstall_adapter(self) -> dict[str, Any] | None:
        """Put the last swapped-in adapter back after a base-weight update dropped it (rollout/lora_swap.py)."""
        from qrl_megatron.rollout.lora_swap import reinstall_adapter

        return reinstall_adapter(self)

    def qrl_set_norms(self, info: dict[str, Any]) -> dict[str, Any]:
        """Trained decoder-layer RMSNorm weights (HF names), checksummed, copied in place (rollout/lora_swap.py)."""
        from qrl_megatron.rollout.lora_swap import set_norms

        return set_norms(self, info)


def refresh_tied_lm_head(model: Any) -> None:
    """Re-derive the tied lm_head's kernel state from the (reloaded) embedding.

    With tied embeddings vLLM's lm_head shares the embedding's weight but is a module of its own; on CPU its
    `process_weights_after_loading` pre-packs that weight for oneDNN. The in-place reload only re-processes
    modules that received weights, so the lm_head kept the *old* packed copy (measured: a reload that changed
    only the embedding left logprobs 0.6 nats off the new weights, 1e-2 — bf16 rounding — after this refresh).
    """
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head is embed:
        return
    if lm_head.weight.data_ptr() != embed.weight.data_ptr():
        return  # untied: the lm_head received its own weights and was re-processed
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)
