"""The training loop's only door to ``torch.distributed``.

NCCL accepts only tensors on the rank's own CUDA device, while gloo (the CPU backend the test suite runs) takes
anything: a statistic built on the CPU passes every CPU test and crashes the first GPU step. So the loop never
calls a collective itself; :class:`Collectives` builds every tensor it reduces on the device the loop trains on.
"""

from __future__ import annotations

import os
from pathlib import Path
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


SHM_DIR = Path("/dev/shm")


def cpu_allreduce_buffer(rank: int, shm_dir: Path = SHM_DIR) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` of this process group."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return shm_dir / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_allreduce_buffer(comm: Collectives, shm_dir: Path = SHM_DIR) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped every buffer.

    DeepSpeed's CPU shared-memory all-reduce creates one ~69 MB file per process in /dev/shm, named by
    MASTER_ADDR, MASTER_PORT and rank, and never removes it: every CPU run on a new port left 140 MB behind (a
    day of test runs filled 19 GB of a 24 GB machine's memory and stalled the next training). Each rank maps
    every peer's buffer while the process group starts, and a mapping outlives its name, so after a barrier the
    names can go at once: a finished, failed or killed run then leaves nothing behind.
    """
    if comm.device.type != "cpu" or not shm_dir.is_dir():
        return
    comm.barrier()
    cpu_allreduce_buffer(comm.rank, shm_dir).unlink(missing_ok=True)


def start_process_group(device: Union[str, torch.device], backend: str) -> Collectives:
    """``deepspeed.init_distributed`` with ``backend``, then the :class:`Collectives` of ``device``.

    On the CPU, DeepSpeed's shared-memory buffer names are released as soon as every rank has mapped them
    (:func:`release_cpu_allreduce_buffer`), so no run leaves one behind.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    comm = Collectives(device)
    release_cpu_allreduce_buffer(comm)
    return comm
