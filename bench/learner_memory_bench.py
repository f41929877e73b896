"""Learner memory discipline, measured: activation bytes per recompute setting, the chunked logprob head.

Two tables (CPU, one process, gloo world of one):

* ``recompute``: bytes autograd saves over one micro-batch's training forward of the tiny model
  (``qrl_megatron.learner.activations.measure_saved_activation_bytes``) for each ``learner.recompute`` and
  ``learner.logprob_chunk_tokens`` setting, full-parameter and LoRA.
* ``logprobs``: ``token_logprobs_and_entropy`` alone on ``[tokens, vocab]`` bf16 logits: the bytes it saves for the
  backward besides the logits, forward+backward time, and whether values and gradients equal the one-pass ones.

    .venv/bin/python bench/learner_memory_bench.py --quick       # ~1 minute
    .venv/bin/python bench/learner_memory_bench.py --out bench/results/learner_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recompute_table(seq_length: int, micro_batch: int) -> list[dict]:
    from qrl_megatron.config import LearnerConfig
    from qrl_megatron.learner.activations import measure_saved_activation_bytes
    from qrl_megatron.learner.batch import pack_sequences
    from qrl_megatron.learner.config import LoRAConfig
    from qrl_megatron.learner.learner import Learner
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.models.tiny import build_tiny_model
    from qrl_megatron.platform import init_distributed

    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="qrl-bench-")), seed=0)
    layout = init_distributed(1, 1, seed=0)
    spec, weights = load_spec(model_dir), load_hf_weights(model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = seq_length // 6
    prompts = [torch.randint(2, spec.vocab_size, (prompt,), generator=g).tolist() for _ in range(micro_batch)]
    lengths = torch.randint(seq_length // 8, seq_length - prompt, (micro_batch,), generator=g).tolist()
    completions = [torch.randint(2, spec.vocab_size, (n,), generator=g).tolist() for n in lengths]
    batch = pack_sequences(prompts, completions, seq_length, 0)
    rows = []
    for lora in (0, 8):
        for recompute in ("none", "selective", "full"):
            for chunk in (0, 1024):
                cfg = LearnerConfig(
                    micro_batch_size=micro_batch,
                    recompute=recompute,
                    logprob_chunk_tokens=chunk,
                    lora=LoRAConfig(rank=lora),
                )
                learner = Learner(spec, layout, cfg, weights, lr=1e-4, seq_length=seq_length)
                saved = measure_saved_activation_bytes(learner, batch)
                rows.append({"lora_rank": lora, "recompute": recompute, "chunk": chunk, "saved_bytes": saved})
    return rows


def logprob_table(tokens: int, vocab: int, chunks: list[int]) -> list[dict]:
    from qrl_megatron.learner.activations import SavedTensorMeter
    from qrl_megatron.learner.learner import token_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, tokens // 4, vocab, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (4, tokens // 4), generator=g)
    rows, reference = [], None
    for chunk in [0, *chunks]:
        x = logits.clone().requires_grad_()
        start = time.perf_counter()
        with SavedTensorMeter(exclude=[x]) as meter:
            logp, entropy = token_logprobs_and_entropy(x, labels, 1.0, chunk)
        (logp.sum() + entropy.sum()).backward()
        seconds = time.perf_counter() - start
        result = (logp.detach(), entropy.detach(), x.grad)
        reference = reference or result
        same = all(torch.equal(a, b) for a, b in zip(result, reference, strict=True))
        rows.append({"chunk": chunk, "saved_bytes": meter.bytes, "seconds": round(seconds, 3), "equal": same})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (about a minute)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/learner_memory.json", help="JSON output path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seq_length, micro_batch = (64, 4) if args.quick else (128, 8)
    tokens, vocab = (512, 8192) if args.quick else (2048, 32768)
    recompute = recompute_table(seq_length, micro_batch)
    print(f"saved activations, tiny model, one micro-batch of {micro_batch} x {seq_length} tokens (fp32)")
    print(f"{'lora':>4} {'recompute':>9} {'chunk':>5} {'MB':>8}")
    for r in recompute:
        print(f"{r['lora_rank']:>4} {r['recompute']:>9} {r['chunk']:>5} {r['saved_bytes'] / 1e6:>8.2f}")
    logprobs = logprob_table(tokens, vocab, [1024, 256])
    print(f"\nlogprob head, {tokens} tokens x {vocab} vocab, bf16 logits ({tokens * vocab * 2 / 1e6:.0f} MB)")
    print(f"{'chunk':>5} {'saved MB':>9} {'fwd+bwd s':>9} {'equal':>5}")
    for r in logprobs:
        print(f"{r['chunk']:>5} {r['saved_bytes'] / 1e6:>9.2f} {r['seconds']:>9.2f} {r['equal']!s:>5}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "quick": args.quick, "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "recompute": recompute, "logprobs": logprobs}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
