"""What the learner needs from the machine it runs on, in three parts that change for different reasons.

* :mod:`~qrl_megatron.platform.cpu_shim` -- the megatron-core CPU shim (``apply_cpu_shim``, its ``MANIFEST`` of
  patched modules/callables with reasons, the megatron-core version guard, ``cuda_tensor_compat``). Changes
  when megatron-core does.
* :mod:`~qrl_megatron.platform.distributed` -- device / back-end choice and process-group set-up
  (``is_cuda_available``, ``device``, ``default_backend``, ``init_distributed``, ``destroy_distributed``,
  ``ParallelLayout``). Changes when the launch story does.
* :mod:`~qrl_megatron.platform.layout` -- ``validate_layout``, the one pure TP x PP x DP check shared by the
  model builder and the bridge plan. Changes when a parallelism constraint does.

Everything is re-exported here so callers import from ``qrl_megatron.platform`` without knowing the split.
"""

from qrl_megatron.platform.cpu_shim import (
    MANIFEST,
    apply_cpu_shim,
    check_megatron_version,
    cuda_tensor_compat,
    is_cpu_shim_applied,
)
from qrl_megatron.platform.distributed import (
    ParallelLayout,
    default_backend,
    destroy_distributed,
    device,
    init_distributed,
    is_cuda_available,
)
from qrl_megatron.platform.layout import ModelShape, validate_layout

__all__ = [
    "MANIFEST",
    "ModelShape",
    "ParallelLayout",
    "apply_cpu_shim",
    "check_megatron_version",
    "cuda_tensor_compat",
    "default_backend",
    "destroy_distributed",
    "device",
    "init_distributed",
    "is_cpu_shim_applied",
    "is_cuda_available",
    "validate_layout",
]
