"""The training loop's only door to ``torch.distributed``.

NCCL accepts only tensors on the rank's own CUDA device, while gloo (the CPU backend the test suite runs) takes
anything: a statistic built on the CPU passes every CPU test and crashes the first GPU step. So the loop never
calls a collective itself; :class:`Collectives` builds every tensor it reduces on the device the loop trains on.
"""

from __future__ import annotations

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
