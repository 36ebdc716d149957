"""Checkpoints that a crash cannot corrupt, and exact resume.

Layout under ``OUTPUT_DIR/checkpoints/``::

    step_<N>/                 DeepSpeed's own files (model, optimizer, scheduler states; every ZeRO stage)
        trainable.safetensors the trainable weights, gathered to full 16/32-bit tensors (what export reads)
        client_state.json     step, consumed micro-batches, config snapshot
        rng_state_rank<r>.pt  each rank's torch / numpy / python RNG states
        COMPLETE              written last, after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint, replaced atomically

DeepSpeed's own ``latest`` write is disabled (``save_latest=False``): ours is written only once the
checkpoint is whole, so a crash mid-save leaves ``latest`` on the previous, loadable checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from gpt4roi_sft.atomic import apply_default_mode, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINABLE_FILE = "trainable.safetensors"
CLIENT_STATE_FILE = "client_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step}"


def is_complete(step_dir: Path) -> bool:
    return (step_dir / COMPLETE_MARKER).is_file()


def complete_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and is_complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest(output_dir) -> Optional[Path]:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the newest complete one."""
    root = checkpoints_root(output_dir)
    latest_file = root / "latest"
    if latest_file.is_file():
        tag = latest_file.read_text(encoding="utf-8").strip()
        candidate = root / tag
        if tag and is_complete(candidate):
            return candidate
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest_file, tag)
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def resolve_step_dir(path) -> Path:
    """Accept an output dir, its ``checkpoints/`` folder, or one ``step_<N>`` dir; return a complete step dir."""
    from gpt4roi_sft.errors import UserError

    p = Path(path)
    if _STEP_DIR.match(p.name):
        if not is_complete(p):
            raise UserError(f"{p}: not a complete checkpoint (no {COMPLETE_MARKER} marker; the save was interrupted)")
        return p
    latest = find_latest(p.parent if p.name == "checkpoints" else p)
    if latest is not None:
        return latest
    raise UserError(f"{p}: no complete checkpoint found (looked for checkpoints/step_<N>/{COMPLETE_MARKER})")


def capture_rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Python, numpy and torch CPU RNG states, plus the accelerator's RNG state when ``device`` is one."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            log.warning("checkpoint has no CUDA RNG state (saved on a CPU run); %s keeps its current one", device)


def save_rng_state(step_dir: Path, rank: int, device: Optional[torch.device] = None) -> None:
    """This rank's RNG states (including its own CUDA generator) to ``rng_state_rank<rank>.pt``."""
    step_dir.mkdir(parents=True, exist_ok=True)
    tmp = step_dir / f".rng_state_rank{rank}.pt.tmp"
    torch.save(capture_rng_state(device), tmp)
    tmp.replace(step_dir / f"rng_state_rank{rank}.pt")


def load_rng_state(step_dir: Path, rank: int, device: Optional[torch.device] = None) -> None:
    path = step_dir / f"rng_state_rank{rank}.pt"
    if path.is_file():
        # RNG states are CPU byte tensors whatever device saved them; map_location keeps them there.
        restore_rng_state(torch.load(path, map_location="cpu", weights_only=False), device)
    else:
        log.warning("%s missing; RNG state not restored for rank %d", path, rank)


def save_trainable(step_dir: Path, state_dict: Dict[str, torch.Tensor]) -> None:
    """Write the gathered trainable weights; an empty tensor means a ZeRO-3 gather went wrong, so refuse."""
    from safetensors.torch import save_file

    empty = [name for name, t in state_dict.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty tensors (ZeRO-3 gather failed?): {', '.join(empty[:5])}")
    tmp = step_dir / f".{TRAINABLE_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    apply_default_mode(tmp)  # safetensors creates its files 0600
    tmp.replace(step_dir / TRAINABLE_FILE)


def load_trainable(step_dir: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(step_dir) / TRAINABLE_FILE))


def write_client_state(step_dir: Path, state: Dict[str, Any]) -> None:
    write_json_atomic(step_dir / CLIENT_STATE_FILE, state)


def read_client_state(step_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(step_dir) / CLIENT_STATE_FILE).read_text(encoding="utf-8"))


def mark_complete_and_publish(root: Path, step_dir: Path, keep_last: int) -> None:
    """Rank 0, after every rank wrote its part: mark the step complete, point ``latest`` at it, prune."""
    write_text_atomic(step_dir / COMPLETE_MARKER, "ok\n")
    write_text_atomic(root / "latest", step_dir.name)
    done = complete_checkpoints(root)
    for _, old in done[:-keep_last] if keep_last > 0 else []:
        if old != step_dir:
            shutil.rmtree(old, ignore_errors=True)
    # Incomplete step dirs older than the one just published are leftovers of crashed saves.
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and not is_complete(child) and int(m.group(1)) < int(step_dir.name.split("_")[1]):
            shutil.rmtree(child, ignore_errors=True)


def gather_trainable_state_dict(module: torch.nn.Module, zero_stage: int, is_rank0: bool, chunk: int = 64) -> Dict[str, torch.Tensor]:
    """Full copies of the trainable parameters on rank 0 (a collective under ZeRO-3: every rank must call it).

    Parameters are gathered ``chunk`` at a time so a full fine-tune never holds the whole model twice.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out: Dict[str, torch.Tensor] = {}
    if zero_stage == 3:
        import deepspeed

        for start in range(0, len(named), chunk):
            part = named[start : start + chunk]
            with deepspeed.zero.GatheredParameters([p for _, p in part], modifier_rank=None):
                if is_rank0:
                    for n, p in part:
                        out[n] = p.detach().to("cpu", copy=True)
    elif is_rank0:
        for n, p in named:
            out[n] = p.detach().to("cpu", copy=True)
    return out

