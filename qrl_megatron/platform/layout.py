"""The one TP x PP x DP layout check.

The model builder (``learner.model.build_gpt_model``) and the weight-sync planner (``bridge.plan.build_plan``)
must agree on which layouts are legal: a layout the learner accepts but the planner rejects (or the reverse) would
only surface at the first weight sync, after a full training step. So both call this one function, and it is
pure (numbers in, numbers or ValueError out; no process groups, no torch), so the planner can run it on any rank,
or on none, and the config layer can run it before anything is launched.

Errors name the config key (``learner.tp`` / ``learner.pp`` / ``learner.dp``) because that is what a user edits.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ModelShape", "validate_layout"]


class ModelShape(Protocol):
    """The model dimensions a layout must divide (``models.registry.ModelSpec`` has them all)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_query_groups(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def ffn_hidden_size(self) -> int: ...


def _positive_int(value: object) -> bool:
    # bool is an int subclass, but ``learner.tp: true`` is a config mistake, not TP=1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_layout(
    tp: int,
    pp: int,
    dp: int | None,
    world_size: int,
    num_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    vocab_size: int | None = None,
    ffn_hidden_size: int | None = None,
    *,
    model: ModelShape | None = None,
) -> int:
    """Check a TP x PP x DP layout against the world size and (optionally) the model shape.

    ``dp=None`` means "whatever is left": ``world_size // (tp * pp)``. Returns the data-parallel size.
    ``model`` (a ``ModelSpec``) supplies every model dimension not passed explicitly, so callers holding a spec
    do not restate its fields. Raises ValueError naming the config key and the numbers.
    """
    if model is not None:
        num_layers = model.num_layers if num_layers is None else num_layers
        num_attention_heads = model.num_attention_heads if num_attention_heads is None else num_attention_heads
        num_query_groups = model.num_query_groups if num_query_groups is None else num_query_groups
        vocab_size = model.vocab_size if vocab_size is None else vocab_size
        ffn_hidden_size = model.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size

    for key, value in (("learner.tp", tp), ("learner.pp", pp)):
        if not _positive_int(value):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    if dp is None:
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"learner.tp * learner.pp = {tp}*{pp} = {tp * pp} does not divide the world size {world_size} "
                "(learner.dp would not be an integer)"
            )
        dp = world_size // (tp * pp)
    elif not _positive_int(dp):
        raise ValueError(f"learner.dp must be a positive integer, got {dp!r}")
    if tp * pp * dp != world_size:
        raise ValueError(
            f"learner.tp * learner.pp * learner.dp = {tp}*{pp}*{dp} = {tp * pp * dp} must equal the world size "
            f"{world_size}"
        )
    # Megatron splits heads, KV groups, the vocab (vocab-parallel embedding / output) and the MLP columns evenly
    # over TP ranks, and layers evenly over PP stages; an uneven split fails deep inside model construction.
    tp_divides = (
        ("num_attention_heads", num_attention_heads),
        ("num_query_groups (num_key_value_heads)", num_query_groups),
        ("vocab_size", vocab_size),
        ("ffn_hidden_size (intermediate_size)", ffn_hidden_size),
    )
    for what, size in tp_divides:
        if size is not None and size % tp != 0:
            raise ValueError(f"learner.tp = {tp} must divide the model's {what} = {size}")
    if num_layers is not None and num_layers % pp != 0:
        raise ValueError(f"learner.pp = {pp} must divide the model's num_layers = {num_layers}")
    return dp
