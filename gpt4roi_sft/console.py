"""What a command prints besides its own output: the logging set-up every entry point shares.

Third-party notices that say nothing about this run are lowered to errors-only: torch's "No CUDA runtime is
found" on a machine that has no GPU, and bitsandbytes' note about its CPU 4-bit kernels when nothing is
quantized (QLoRA keeps it, since there it explains the speed).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

_FORMAT = "%(levelname)s %(name)s: %(message)s"


def quiet_irrelevant_notices(uses_4bit: bool = False, has_gpu: Optional[bool] = None) -> None:
    """Silence the third-party notices that mean nothing for this run (call before importing deepspeed/peft)."""
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    if not has_gpu:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not uses_4bit:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates on every LoRA run.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def setup_cli_logging(rank: int = 0, fmt: str = _FORMAT, uses_4bit: bool = False) -> None:
    """INFO on rank 0 (WARNING elsewhere) to stderr, with :func:`quiet_irrelevant_notices` applied."""
    import sys

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, stream=sys.stderr)
    quiet_irrelevant_notices(uses_4bit=uses_4bit)
