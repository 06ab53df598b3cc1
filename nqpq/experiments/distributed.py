"""torch.distributed glue for ``torchrun --nproc-per-node N -m nqpq sweep``.

Everything here is a no-op in a single process, so the sweep code calls it
unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import NqpqError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None) -> str | None:
    """Join the process group torchrun set up; return this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device


def check_device_map(device_map: str | dict | None) -> None:
    """Refuse what torchrun and a device map cannot do together.

    Every rank loads its own copy with the map. A map that places modules only on ``cpu`` and ``disk``
    combines with torchrun (the ranks reduce over gloo; each rank offloads to its own subfolder). A map onto
    GPUs would put every rank's copy on the same cards (accelerate sees all of them from every process), so it
    is refused, naming the two ways that work.
    """
    if device_map is None or not launched_by_torchrun():
        return
    if isinstance(device_map, dict):
        on_gpu = any(not (isinstance(p, str) and p in ("cpu", "disk")) for p in device_map.values())
    else:  # a strategy uses every visible GPU
        on_gpu = torch.cuda.is_available()
    if on_gpu:
        raise NqpqError(
            "torchrun with a --device-map onto GPUs is not supported (every rank would place its copy on the same "
            "cards): use either torchrun (one model copy per GPU, blocks split across ranks) or --device-map in a "
            "single process (one model spread over the GPUs)")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces CUDA tensors only
        on_gpu = t.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return t.copy_(on_gpu)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
