"""Worker functions for the multi-process model tests (importable by spawned processes; not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch

SEQ_LEN = 24
MICRO_BATCH = 2
NUM_MICROBATCHES = 2


def example_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic token ids [NUM_MICROBATCHES * MICRO_BATCH, SEQ_LEN] and position ids."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(2, vocab_size, (NUM_MICROBATCHES * MICRO_BATCH, SEQ_LEN), generator=gen)
    pos = torch.arange(SEQ_LEN).expand_as(ids).contiguous()
    return ids, pos


def load_hf_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def pipeline_logits(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
    """Forward-only pass through megatron's pipeline schedule; full logits [B, S, V] on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = [
        (ids[i * MICRO_BATCH : (i + 1) * MICRO_BATCH], pos[i * MICRO_BATCH : (i + 1) * MICRO_BATCH])
        for i in range(NUM_MICROBATCHES)
    ]

    def forward_step(data_iterator, model):
        mb_ids, mb_pos = next(data_iterator)
        output = model(mb_ids, mb_pos, None)

        def loss_func(output_tensor):
            return output_tensor.sum(), {"logits": output_tensor.detach().clone()}

        return output, loss_func

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=NUM_MICROBATCHES,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([o["logits"] for o in outputs], dim=0)


def layout_worker(rank: int, world_size: int, tp: int, pp: int, model_dir: str) -> dict:
    """Load the tiny HF model on a TP x PP layout; return logits (last stage) and gathered weights (rank 0)."""
    from qrl_megatron.learner.model import build_gpt_model, gather_hf_state_dict, load_hf_state_dict
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import init_distributed

    layout = init_distributed(tp, pp, seed=0)
    spec = load_spec(model_dir)
    hf = load_hf_weights(model_dir)
    model = build_gpt_model(spec, layout, parallel_output=False)
    load_hf_state_dict(model, {k: v.float() for k, v in hf.items()}, spec, layout)

    ids, pos = example_batch(spec.vocab_size)
    logits = pipeline_logits(model, ids, pos)

    gathered = gather_hf_state_dict(model, spec, layout, dst=0, dtype=torch.bfloat16)
    everywhere = gather_hf_state_dict(model, spec, layout, dst=None, dtype=torch.bfloat16)
    last = gather_hf_state_dict(model, spec, layout, dst=world_size - 1)
    exact_everywhere = everywhere is not None and set(everywhere) == set(hf)
    exact_everywhere = exact_everywhere and all(torch.equal(everywhere[k], hf[k]) for k in hf)
    exact_last = None
    if rank == world_size - 1:
        exact_last = set(last) == set(hf) and all(torch.equal(last[k].to(torch.bfloat16), hf[k]) for k in hf)
    elif last is not None:
        exact_last = False  # only dst may receive
    return {
        "layout": layout,
        "logits": logits,
        "gathered": gathered,
        "gathered_names": None if gathered is None else list(gathered),
        "exact_everywhere": exact_everywhere,
        "exact_last": exact_last,
    }
