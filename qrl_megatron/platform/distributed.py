"""Device / back-end selection and process-group set-up for the learner.

Why this is its own module: the same entry point (``init_distributed``) has to work under torchrun on a GPU
cluster (NCCL, env:// rendezvous) and as a single CPU process in tests and demos (gloo, no launcher). Keeping the
choice here means the learner, the bridge and the tests never branch on the machine themselves.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch

from qrl_megatron.platform.cpu_shim import apply_cpu_shim
from qrl_megatron.platform.layout import validate_layout
from qrl_megatron.utils.net import free_port

__all__ = [
    "ParallelLayout",
    "default_backend",
    "destroy_distributed",
    "device",
    "init_distributed",
    "is_cuda_available",
]


def is_cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    return bool(torch.cuda.is_available())


def device() -> torch.device:
    """The device the learner's tensors live on: this process's CUDA device when CUDA is in use, else the CPU.

    The one place that decides it: batches, metric reductions (NCCL rejects CPU tensors) and positions follow it,
    and it is the device megatron allocates its pipeline receive buffers on (``torch.cuda.current_device()``;
    the CPU shim redirects that to the CPU, so both sides of a p2p transfer always agree).
    """
    if is_cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """torch.distributed back-end: NCCL with CUDA, gloo otherwise."""
    return "nccl" if is_cuda_available() else "gloo"


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the learner's TP x PP x DP grid."""

    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _init_process_group() -> None:
    """Initialise torch.distributed from torchrun's env vars, or as a single process on a free local port."""
    import torch.distributed as dist

    backend = default_backend()
    # The default (10 min) is shorter than a first vLLM start-up or a large checkpoint load on a busy node.
    timeout = datetime.timedelta(minutes=int(os.environ.get("QRL_DIST_TIMEOUT_MIN", "30")))
    if is_cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        # No launcher: a one-rank world, so megatron's parallel state (which needs a process group) still exists.
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )


def init_distributed(tp: int, pp: int, dp: int | None = None, seed: int = 0) -> ParallelLayout:
    """Set up torch.distributed (if needed), megatron's parallel state and its RNG for a TP x PP x DP layout.

    The layout is validated before any group is created (a bad layout should fail with the config key, not hang
    in a collective). If megatron's parallel state already exists with a different TP/PP it is destroyed and
    rebuilt (the world process group is kept), so tests can switch layouts inside one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    dp_size = validate_layout(tp, pp, dp, world_size)

    if not dist.is_initialized():
        _init_process_group()
    if not is_cuda_available():
        apply_cpu_shim()

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    return ParallelLayout(
        tp=tp,
        pp=pp,
        dp=dp_size,
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group (whichever exist)."""
    import torch.distributed as dist

    # Only if megatron was imported: importing it just to find nothing to destroy costs seconds.
    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
