"""The training loop's only door to ``torch.distributed``.

NCCL accepts only tensors on the rank's own CUDA device, while gloo (the CPU backend the test suite runs) takes
anything: a statistic built on the CPU passes every CPU test and crashes the first GPU step. So the loop never
calls a collective itself; :class:`Collectives` builds every tensor it reduces on the device the loop trains on.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

Number = Union[int, float, torch.Tensor]


def training_device(accelerator_name: str, local_rank: int) -> torch.device:
    """The device a rank trains on: ``cpu``, or ``<accelerator>:<local_rank>`` (e.g. ``cuda:3``)."""
    return torch.device("cpu") if accelerator_name == "cpu" else torch.device(accelerator_name, local_rank)


class Collectives:
    """Reductions, broadcasts and barriers of one process group, with every tensor on ``device``.

    ``device`` is the device the loop trains on (what NCCL requires); values may come in as Python numbers or
    as tensors on any device and are placed there before the collective runs.
    """

    def __init__(self, device: Union[str, torch.device]):
        self.device = torch.device(device)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def stack(self, values: Sequence[Number], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``values`` as one 1-D tensor on the loop's device, built without waiting for the device.

        Device tensors stay where they are; Python numbers travel in non-blocking copies (a blocking
        host-to-device copy would wait for every kernel queued before it).
        """
        parts = []
        for v in values:
            if isinstance(v, torch.Tensor):
                parts.append(v.detach().to(device=self.device, dtype=dtype, non_blocking=True).reshape(1))
            else:
                parts.append(torch.tensor([v], dtype=dtype, device="cpu").to(self.device, non_blocking=True))
        return torch.cat(parts)

    def sum(self, values: Sequence[Number]) -> torch.Tensor:
        """Element-wise sum over ranks of ``values``: a float64 tensor on the loop's device (not read back)."""
        total = self.stack(values)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum_to_host(self, values: Sequence[Number]) -> List[float]:
        """:meth:`sum`, read back as Python floats (one device-to-host sync)."""
        return self.sum(values).tolist()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        box: List[Optional[Any]] = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type != "cpu" else None)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cpu":
            dist.barrier()
        else:
            dist.barrier(device_ids=[self.device.index or 0])


def one_process_port(env=os.environ) -> str:
    """``MASTER_PORT`` of a one-process group (no launcher): the one set (``MASTER_PORT``, then
    ``GPT4ROI_MASTER_PORT``), else a port free now, so two runs started side by side (two single-GPU jobs on one
    machine, tests in parallel) do not both bind one fixed default and fail with "address already in use"."""
    chosen = env.get("MASTER_PORT") or env.get("GPT4ROI_MASTER_PORT")
    if chosen:
        return str(chosen)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


CPU_SHARED_MEMORY_ALLREDUCE_OP = "deepspeed_shm_comm"


def skip_cpu_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce for this process.

    On the CPU accelerator DeepSpeed JIT-compiles that C++ op at every new process group's start (about a minute on
    two cores the first time, in the middle of the first launch) and maps a ~69 MB file per process in /dev/shm
    that it never removes (a day of test runs once filled 19 GB of a 24 GB machine). Only its tensor-parallel
    inference layers call it (``inference_all_reduce``); every all-reduce of training goes through the process
    group (gloo). DeepSpeed builds the op only when its probe of compatible ops lists it, and keeps that probe in
    one dict (``deepspeed.ops.__compatible_ops__``) for the process, so marking the op there is enough.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[CPU_SHARED_MEMORY_ALLREDUCE_OP] = False


def start_process_group(device: Union[str, torch.device], backend: str) -> Collectives:
    """``deepspeed.init_distributed`` with ``backend``, then the :class:`Collectives` of ``device``.

    On the CPU, without DeepSpeed's shared-memory all-reduce (:func:`skip_cpu_shared_memory_allreduce`).
    """
    import deepspeed

    if torch.device(device).type == "cpu":
        skip_cpu_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=backend)
    return Collectives(device)
