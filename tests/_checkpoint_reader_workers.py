"""Worker functions for the multi-process checkpoint-reader tests (importable by spawned processes; not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch


def sliced_vs_full_worker(rank: int, world_size: int, tp: int, pp: int, model_dirs: list[str]) -> dict:
    """Load each of ``model_dirs`` on a TP x PP layout from the lazy reader (slices) and compare every parameter
    with the old path: the whole state dict read with safetensors, mapped with ``hf_to_megatron``, split with
    ``shard_for_tp``. Returns, per folder, the names that differ (expected: none) and how many parameters were
    compared. Every folder in one process group: a launch costs more than a load."""
    from safetensors.torch import load_file

    from qrl_megatron.learner.model import build_gpt_model, global_param_name, load_hf_state_dict
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.hf_mapping import hf_to_megatron, pp_layer_offset, shard_for_tp
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import init_distributed

    layout = init_distributed(tp, pp, seed=0)
    report = {}
    for model_dir in model_dirs:
        spec = load_spec(model_dir)
        model = build_gpt_model(spec, layout)
        load_hf_state_dict(model, load_hf_weights(model_dir), spec, layout)

        full: dict[str, torch.Tensor] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            full.update(load_file(str(f)))
        megatron = hf_to_megatron(full, spec)
        if spec.tie_word_embeddings:
            megatron["output_layer.weight"] = megatron["embedding.word_embeddings.weight"]
        offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
        differ = []
        params = dict(model.named_parameters())
        for name, p in params.items():
            global_name = global_param_name(name, offset)
            want = shard_for_tp(global_name, megatron[global_name], tp, layout.tp_rank, spec).to(p.dtype)
            if not torch.equal(p.detach(), want):
                differ.append(name)
        report[model_dir] = {"differ": differ, "compared": len(params)}
    return {"rank": rank, "report": report}
