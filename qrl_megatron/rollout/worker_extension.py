"""Methods mixed into every vLLM worker (`worker_extension_cls`), called by name through `collective_rpc`.

Called by name rather than as pickled functions so no insecure serialization is needed (vLLM refuses pickled
callables unless VLLM_ALLOW_INSECURE_SERIALIZATION=1).
"""

from __future__ import annotations

from typing import Any


class QRLWorkerExtension:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def qrl_reload_weights_from_file(self, path: str) -> int:
        """In-place reload of checkpoint-format (HF-named) weights from a safetensors file.

        A file (in shared memory) rather than tensors in the RPC: the engine core forwards RPC arguments to its
        workers by pickling, and the tensors it decoded from msgpack are memoryview-backed and cannot be pickled.

        `reload_weights` re-runs the quantization/repacking that vLLM applied at load time; a plain
        `model.load_weights` after start-up does not update CPU-repacked linears (measured, ENVIRONMENT.md).
        """
        from safetensors.torch import load_file

        named_tensors = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        self._refresh_tied_lm_head()
        return len(named_tensors)

    def _refresh_tied_lm_head(self) -> None:
        refresh_tied_lm_head(self.model_runner.get_model())  # type: ignore[attr-defined]

    def qrl_parameter_checksums(self) -> dict[str, float]:
        """float64 sum of every engine parameter (vLLM names): a cheap fingerprint of what the engine holds."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}


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
