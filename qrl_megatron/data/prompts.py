"""Prompt templates: a question (or a published chat list) -> the text the engine continues.

Chat models get their tokenizer's chat template with the generation prompt added; base models (no template) get a
raw layout: system paragraph, question, instruction. Presets carry the system prompt and instruction of the answer
formats the rewards understand (`qrl_megatron.rewards.format`, `qrl_megatron.rewards.verifier`).
"""

from __future__ import annotations

from typing import Any

from qrl_megatron.data.config import PromptConfig

__all__ = ["PRESET_TEXT", "render_prompt", "use_chat"]

# (system prompt, instruction suffix) per preset
PRESET_TEXT: dict[str, tuple[str, str]] = {
    "none": ("", ""),
    "boxed": ("", "Let's think step by step and output the final answer within \\boxed{}."),
    # QeRL (after DeepSeek-R1-Zero): reasoning in <think>, the answer in <answer>
    "qerl": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>.",
        "",
    ),
    # DAPO-Math-17k's own instruction
    "dapo": (
        "",
        "Solve the problem step by step. The last line of your response should be of the form Answer: $Answer "
        "(without quotes) where $Answer is the answer to the problem.",
    ),
}


def use_chat(cfg: PromptConfig, tokenizer: Any) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if cfg.template == "chat" and not has_template:
        from qrl_megatron.config_fields import ConfigError

        raise ConfigError(
            "task.prompt.template=chat but the model's tokenizer has no chat template; use task.prompt.template=raw"
        )
    return cfg.template == "chat" or (cfg.template == "auto" and has_template)


def render_prompt(
    cfg: PromptConfig, tokenizer: Any, question: str, messages: list[dict[str, str]] | None = None
) -> str:
    """The prompt text: the chat template's rendering (generation prompt added) or the raw layout."""
    preset_system, preset_suffix = PRESET_TEXT[cfg.preset]
    system, suffix = cfg.system or preset_system, cfg.suffix or preset_suffix
    if messages is None:
        content = f"{question}\n{suffix}" if suffix else question
        messages = [{"role": "user", "content": content}]
    elif suffix:  # a published chat list: the instruction goes after the last user turn's text
        messages = [dict(m) for m in messages]
        last_user = (
            max(i for i, m in enumerate(messages) if m["role"] == "user")
            if any(m["role"] == "user" for m in messages)
            else len(messages) - 1
        )
        messages[last_user]["content"] += f"\n{suffix}"
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if use_chat(cfg, tokenizer):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    # raw: paragraphs in order (system first); nothing added when there is only the question, so a dataset's own
    # prompt (the arithmetic task's "37+58=") reaches the model exactly as written
    return "\n\n".join(m["content"] for m in messages)
