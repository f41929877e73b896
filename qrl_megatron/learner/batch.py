"""Token batches for the learner: fixed-length right-padded sequences with per-token tensors aligned to labels.

Position t of every per-token tensor describes the prediction of token t+1 (the label), so a completion of k tokens
after a prompt of p tokens occupies positions p-1 .. p+k-2. Batches are built at one fixed length;
:func:`token_budget_groups` cuts them into micro-batches of similar lengths, each padded only to its own longest
(``learner.micro_batch_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, S] int64, right-padded
    labels: torch.Tensor  # [B, S] int64: tokens shifted left by one
    loss_mask: torch.Tensor  # [B, S] float: 1 where the label is a completion token
    advantages: torch.Tensor  # [B] float
    rollout_logprobs: torch.Tensor  # [B, S] float: behaviour-policy (engine) logprobs of the labels
    old_logprobs: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [B, S]: learner before the update
    ref_logprobs: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [B, S]: reference policy (KL)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: slice | torch.Tensor) -> TokenBatch:
        return TokenBatch(
            **{
                f.name: (getattr(self, f.name)[index] if getattr(self, f.name).numel() else getattr(self, f.name))
                for f in fields(self)
            }
        )

    def split(self, parts: int) -> list[TokenBatch]:
        if len(self) % parts:
            raise ValueError(f"a batch of {len(self)} sequences does not split into {parts} equal parts")
        size = len(self) // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    @property
    def num_tokens(self) -> float:
        return float(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch with every tensor on ``device`` (no copy for tensors already there)."""
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def truncated(self, length: int) -> TokenBatch:
        """The first ``length`` positions of every per-token tensor (per-sequence tensors unchanged)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value[:, :length] if value.dim() == 2 else value
        return TokenBatch(**out)

    def needed_lengths(self) -> torch.Tensor:
        """[B] positions each sequence needs: through its last loss position (at least 1). The model is causal,
        so the logits there are the same in any longer right-padded copy of the sequence."""
        positions = torch.arange(1, self.loss_mask.shape[1] + 1, device=self.loss_mask.device)
        return (positions * (self.loss_mask > 0)).amax(dim=1).clamp(min=1)


def token_budget_groups(
    lengths: Sequence[int], budget: int, max_length: int, multiple: int = 8
) -> list[tuple[list[int], int]]:
    """Micro-batches under a token budget: ``[(sequence indices, padded length)]``.

    Sequences are sorted by length (stable: ties keep batch order, so the grouping is deterministic) and taken
    greedily, shortest first, while ``count x padded longest`` stays within ``budget``; each group is padded to its
    own longest length rounded up to ``multiple`` (capped at ``max_length``, the batch's width). A sequence longer
    than the budget on its own gets a micro-batch of one (a sequence cannot be split).
    """

    def padded(n: int) -> int:
        return min(max_length, -(-max(1, n) // multiple) * multiple)

    groups: list[tuple[list[int], int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        width = padded(int(lengths[i]))  # ascending: the newcomer is the group's longest
        if groups and (len(groups[-1][0]) + 1) * width <= budget:
            groups[-1][0].append(i)
            groups[-1] = (groups[-1][0], width)
        else:
            groups.append(([i], width))
    return groups


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    seq_length: int,
    pad_id: int,
    advantages: Sequence[float] | torch.Tensor | None = None,
    rollout_logprobs: Sequence[Sequence[float]] | None = None,
) -> TokenBatch:
    batch = len(prompts)
    tokens = torch.full((batch, seq_length), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, seq_length)
    behaviour = torch.zeros(batch, seq_length)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        sequence = list(prompt) + list(completion)
        if len(sequence) > seq_length:
            raise ValueError(
                f"sequence {i} has {len(sequence)} tokens, more than the model's {seq_length}; "
                "shorten the prompts or rollout.max_new_tokens"
            )
        tokens[i, : len(sequence)] = torch.tensor(sequence)
        start, end = len(prompt) - 1, len(sequence) - 1
        mask[i, start:end] = 1.0
        if rollout_logprobs is not None:
            behaviour[i, start:end] = torch.tensor(rollout_logprobs[i], dtype=torch.float32)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    adv = torch.as_tensor(advantages if advantages is not None else [0.0] * batch, dtype=torch.float32)
    return TokenBatch(tokens=tokens, labels=labels, loss_mask=mask, advantages=adv, rollout_logprobs=behaviour)
