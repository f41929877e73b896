"""The tiny Qwen2 model and its character-level tokenizer, built locally (never downloaded).

Used by the CPU default run and by the tests: a 4-layer Qwen2 (hidden 128, GQA 4 query / 2 KV heads, tied
embeddings, q/k/v bias) over a 64-token character vocabulary covering the synthetic arithmetic tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from qrl_megatron.config_fields import ConfigError, check_positive, doc

__all__ = [
    "CHARSET",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "TinyModelConfig",
    "build_tiny_model",
    "build_tokenizer",
    "init_weights",
    "tiny_vocab",
]

# Characters of the synthetic tasks: digits, arithmetic/prompt symbols (space included), lowercase letters.
CHARSET = "0123456789" + "+-*=?: " + "abcdefghijklmnopqrstuvwxyz"
PAD_TOKEN, PAD_TOKEN_ID = "<|pad|>", 0
EOS_TOKEN, EOS_TOKEN_ID = "<|endoftext|>", 1
_SPECIALS = (PAD_TOKEN, EOS_TOKEN)
_MARKER = ".qrl_tiny_model.json"
_FORMAT_VERSION = 2  # 2: the marker records the config-node field names


def _byte_level(ch: str) -> str:
    """GPT-2 byte-level alphabet symbol of an ASCII character (printable ASCII is itself, space is 'Ġ')."""
    b = ord(ch)
    if not 0 <= b < 128:
        raise ValueError(f"CHARSET must be ASCII, got {ch!r}")
    return ch if 33 <= b <= 126 else chr(256 + b if b < 33 else b + 162)


def tiny_vocab(vocab_size: int = 64) -> dict[str, int]:
    """Token -> id: pad 0, eos 1, then CHARSET in order (byte-level symbols), then ``<|extra_k|>`` fillers."""
    if vocab_size % 8 != 0:
        raise ValueError(f"vocab_size must be a multiple of 8, got {vocab_size}")
    tokens = list(_SPECIALS) + [_byte_level(c) for c in CHARSET]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens)} base tokens")
    tokens += [f"<|extra_{k}|>" for k in range(vocab_size - len(tokens))]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 64, model_max_length: int = 128):
    """Character-level ``PreTrainedTokenizerFast``; saved with ``save_pretrained`` when ``out_dir`` is given.

    One token per character (no BOS, no merges): ``decode(encode(s)) == s`` for any string over CHARSET;
    characters outside CHARSET are dropped. It is a byte-level BPE with an empty merge list rather than a
    WordLevel model because transformers 5 loads any ``model_type: qwen2`` folder through ``Qwen2Tokenizer``
    (qwen2 is in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), which rebuilds a byte-level BPE from the
    saved vocab and ignores a saved pre-tokenizer/decoder; this design gives the same ids and text through
    ``PreTrainedTokenizerFast``, ``AutoTokenizer`` (-> ``Qwen2Tokenizer``) and vLLM.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Every character its own piece, then the byte-level alphabet (space -> 'Ġ'); no merges exist anyway.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("."), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in vocab if t in _SPECIALS or t.startswith("<|extra_")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )
    if out_dir is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok


# Fixed by the architecture (Qwen2: q/k/v bias; tied embeddings at this size), not by the run's config.
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-6
TIE_WORD_EMBEDDINGS = True


@dataclass
class TinyModelConfig:
    """Shape of the tiny Qwen2 model: the one description, used as the `model.tiny` config node and by the builder."""

    hidden_size: int = doc(128, "hidden size of the locally built tiny Qwen2 model")
    num_layers: int = doc(4, "transformer layers")
    num_attention_heads: int = doc(4, "query heads (head_dim = hidden_size / heads)")
    num_query_groups: int = doc(2, "key/value heads (GQA groups)")
    ffn_hidden_size: int = doc(352, "SwiGLU intermediate size")
    vocab_size: int = doc(64, "padded character vocabulary size (multiple of 8)")
    max_position_embeddings: int = doc(128, "longest sequence (prompt + completion)")

    def validate(self, prefix: str = "model.tiny") -> None:
        for f in fields(self):
            check_positive(f"{prefix}.{f.name}", getattr(self, f.name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{prefix}.hidden_size must be divisible by {prefix}.num_attention_heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"{prefix}.num_attention_heads must be divisible by {prefix}.num_query_groups")
        if self.vocab_size % 8:
            raise ConfigError(f"{prefix}.vocab_size={self.vocab_size} must be a multiple of 8")

    def cache_name(self, seed: int) -> str:
        """Folder name of the built model under run.cache_dir (every shape field and the init seed)."""
        return (
            f"tiny-h{self.hidden_size}-l{self.num_layers}-a{self.num_attention_heads}-g{self.num_query_groups}"
            f"-f{self.ffn_hidden_size}-v{self.vocab_size}-p{self.max_position_embeddings}-s{seed}"
        )


def _hf_config(cfg: TinyModelConfig):
    from transformers import Qwen2Config

    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_theta": ROPE_THETA, "rope_type": "default"},
        rms_norm_eps=RMS_NORM_EPS,
        tie_word_embeddings=TIE_WORD_EMBEDDINGS,
        use_sliding_window=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        dtype="bfloat16",
    )


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init, independent of transformers' own init order: parameters in name order from one
    generator; matrices and biases N(0, 0.02), norm weights 1 + N(0, 0.02) (non-trivial, so that a mapping
    mistake on norms or biases shows up in logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
            p.copy_(noise + 1.0 if "norm" in name else noise)


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None, seed: int = 0) -> Path:
    """Write the tiny ``Qwen2ForCausalLM`` (bf16 safetensors), tokenizer and generation config to ``out_dir``.

    Skips the work when ``out_dir`` already holds a model built with the same config and seed (marker file).
    Same config + seed -> byte-identical weight files.
    """
    from transformers import GenerationConfig, Qwen2ForCausalLM

    cfg = cfg or TinyModelConfig()
    cfg.validate("model.tiny")
    out = Path(out_dir)
    marker = {"format": _FORMAT_VERSION, "seed": seed, "config": asdict(cfg)}
    marker_path = out / _MARKER
    if marker_path.is_file():
        try:
            if json.loads(marker_path.read_text()) == marker and (out / "model.safetensors").is_file():
                return out
        except json.JSONDecodeError:
            pass

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir, then move the files in: a concurrent reader never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch_default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            model = Qwen2ForCausalLM(_hf_config(cfg))
        finally:
            torch.set_default_dtype(torch_default)
        init_weights(model, seed)
        model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' typed wrapper confuses mypy
        model.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = "bfloat16"  # older readers look for torch_dtype, transformers 5 writes dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        GenerationConfig(eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=None).save_pretrained(
            str(tmp)
        )
        build_tokenizer(tmp, vocab_size=cfg.vocab_size, model_max_length=cfg.max_position_embeddings)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")

        out.mkdir(parents=True, exist_ok=True)
        if marker_path.exists():
            marker_path.unlink()  # invalid until the new files are all in place
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644)  # some writers create 0600 files; the folder is read by other users/processes
            if f.name != _MARKER:
                os.replace(f, out / f.name)
        os.replace(tmp / _MARKER, marker_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
