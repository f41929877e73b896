"""qrl-megatron: RLVR with quantized vLLM rollouts and a Megatron-core learner."""

__version__ = "0.1.0"
