"""qrl-export: a run's checkpoint (any TP/PP layout) -> a complete Hugging Face model folder.

    qrl-export RUN_DIR_OR_CHECKPOINT OUT [--format base|bfloat16|float16|float32|nvfp4|fp8|int8]

One process reads the Megatron dist checkpoint into a TP=1 PP=1 model (dist checkpointing reshards whatever
layout it was written at) and streams it into ``OUT`` through the same writer as the run's ``final/`` folder:
sharded safetensors + index, config, generation config and tokenizer (copied from the checkpoint's ``hf/``, the
base model's files recorded at save time). ``--format nvfp4|fp8|int8`` writes the quantized rollout folder for
serving instead (te_ext's compressed-tensors layout). Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from qrl_megatron.hf_export import DEFAULT_MAX_SHARD_MIB, DTYPES, ROLLOUT_FORMATS

__all__ = ["EXIT_BAD_INPUT", "main", "run_export"]

EXIT_BAD_INPUT = 2
FORMATS = ("base", *DTYPES, *ROLLOUT_FORMATS)


class ExportError(ValueError):
    """Bad input to qrl-export; the message names the problem and the fix."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrl-export",
        description="Export a qrl-megatron checkpoint (any TP/PP layout) as a complete Hugging Face model folder.",
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder (run.dir) or its checkpoint/")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty)")
    parser.add_argument(
        "--format",
        default="base",
        choices=FORMATS,
        help="base: the base model's dtype (default); bfloat16/float16/float32: that dtype; "
        "nvfp4/fp8/int8: a quantized rollout folder for vLLM (compressed-tensors)",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="HF folder to take config/tokenizer from (default: the checkpoint's hf/, else the recorded base model)",
    )
    parser.add_argument(
        "--max-shard-mib", type=int, default=DEFAULT_MAX_SHARD_MIB, help="size limit of one safetensors shard (MiB)"
    )
    return parser


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; pick a new OUT or remove it")


def _metadata_dir(ckpt: Path, meta: dict, base: str | None) -> Path:
    from qrl_megatron.learner.checkpoint import HF_DIR

    if base is not None:
        candidate = Path(base)
    elif (ckpt / HF_DIR / "config.json").is_file():
        candidate = ckpt / HF_DIR
    elif meta.get("base_model"):
        candidate = Path(meta["base_model"])
    else:
        raise ExportError(f"{ckpt} records no base model folder; pass --base DIR (the HF folder the run started from)")
    if not (candidate / "config.json").is_file():
        raise ExportError(f"{candidate} has no config.json (the base model folder is gone?); pass --base DIR")
    return candidate


def run_export(
    source: str | Path,
    out: str | Path,
    fmt: str = "base",
    *,
    base: str | None = None,
    max_shard_mib: int = DEFAULT_MAX_SHARD_MIB,
) -> Path:
    """Export the checkpoint at ``source`` (or a run folder's ``checkpoint/``) to ``out``; returns ``out``."""
    from dataclasses import asdict

    import torch

    from qrl_megatron.hf_export import base_dtype, export_policy, export_rollout_format
    from qrl_megatron.learner.checkpoint import load_model_weights, read_checkpoint_meta, resolve_checkpoint
    from qrl_megatron.learner.model import build_gpt_model
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import destroy_distributed, init_distributed

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if max_shard_mib <= 0:
        raise ExportError(f"--max-shard-mib must be positive, got {max_shard_mib}")
    out = Path(out)
    _check_out(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ExportError(
            "qrl-export runs as one process (it reshards any layout itself); do not start it with torchrun"
        )
    ckpt = resolve_checkpoint(source)
    meta = read_checkpoint_meta(ckpt)
    hf_dir = _metadata_dir(ckpt, meta, base)
    spec = load_spec(hf_dir)
    recorded, current = meta.get("spec") or {}, json_round_trip(asdict(spec))
    # Only the fields both versions know: a checkpoint from an older release lacks fields added since.
    if any(recorded[k] != current[k] for k in recorded.keys() & current.keys()):
        raise ExportError(
            f"{hf_dir}/config.json describes another model than the checkpoint holds ({ckpt}/meta.json spec); "
            "pass --base with the run's base model folder"
        )
    params_dtype = DTYPES.get(str(meta.get("params_dtype", "float32")), torch.float32)
    if fmt == "base":
        dtype = base_dtype(hf_dir)
    elif fmt in DTYPES:
        dtype = DTYPES[fmt]
    else:
        dtype = torch.bfloat16  # the quantized formats keep embeddings, norms and lm_head in bf16

    layout = init_distributed(1, 1, seed=0)
    try:
        model = build_gpt_model(spec, layout, params_dtype=params_dtype)
        load_model_weights(model, ckpt)
        shard_bytes = max_shard_mib * 2**20
        if fmt in ROLLOUT_FORMATS:
            staging = out.with_name(out.name + f".{fmt}-source.partial")
            try:
                export_policy(model, spec, layout, staging, hf_dir, dtype=dtype, max_shard_bytes=shard_bytes)
                if out.exists():
                    out.rmdir()  # empty (checked above): replaced by the renamed folder
                export_rollout_format(staging, out, fmt, max_shard_bytes=shard_bytes)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            export_policy(model, spec, layout, out, hf_dir, dtype=dtype, max_shard_bytes=shard_bytes)
    finally:
        destroy_distributed()
    return out


def json_round_trip(value: dict) -> dict:
    """``value`` as it reads back from JSON (tuples become lists), to compare with a stored ``meta.json``."""
    import json

    return json.loads(json.dumps(value, default=str))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        out = run_export(args.source, args.out, args.format, base=args.base, max_shard_mib=args.max_shard_mib)
    except (ExportError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as err:
        print(f"qrl-export: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"qrl-export: wrote {out} ({args.format}, {len(files)} files, {size / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
