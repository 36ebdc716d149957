"""Checkpoints that a crash cannot corrupt, and exact resume.

Layout under ``OUTPUT_DIR/checkpoints/``::

    step_<N>/                 DeepSpeed's own files (model, optimizer, scheduler states; every ZeRO stage), or
                              engine_state.pt (train.engine=torch: fp32 masters, AdamW, schedule)
        trainable.safetensors the trainable weights, gathered to full 16/32-bit tensors (what export reads)
        client_state.json     step, consumed micro-batches, config snapshot
        rng_state_rank<r>.pt  each rank's torch / numpy / python RNG states
        data_position_rank<r>.json  each rank's next sample, for streams that need more than the micro-batch count
        COMPLETE              written last, after every rank finished writing (resume and export also need
                              trainable.safetensors to be as long as its header says; a copy can cut it short)
    latest                    the tag of the newest COMPLETE checkpoint, replaced atomically

DeepSpeed's own ``latest`` write is disabled (``save_latest=False``): ours is written only once the
checkpoint is whole, so a crash mid-save leaves ``latest`` on the previous, loadable checkpoint.

Resuming on another number of processes: DeepSpeed's ZeRO files are partitioned for the world size that
wrote them, and its loader refuses any other. :func:`convert_to_universal` turns them into DeepSpeed's
*universal checkpoint* (one folder per parameter with its fp32 weights and Adam moments, the same for ZeRO-1,
2 and 3), which an engine built with ``"checkpoint": {"load_universal": true}`` re-partitions for its own
world size. The conversion is made at resume time, only when the world size changed, so a save costs nothing
extra; the data position is global (``data_position``, see :mod:`gpt4roi_sft.train.data_stream`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from gpt4roi_sft.atomic import apply_default_mode, write_json_atomic, write_text_atomic
from gpt4roi_sft.errors import DataError, UserError
from gpt4roi_sft.json_io import load_json

if TYPE_CHECKING:
    from gpt4roi_sft.config import Config

log = logging.getLogger(__name__)

# Keys that decide which parameters train and how they are wrapped: a checkpoint resumes only under the same.
RESUME_KEYS = ("model.path", "model.vision_tower", "model.freeze", "lora.enabled", "lora.r", "lora.alpha",
               "lora.target_modules", "lora.modules_to_save", "lora.qlora")
UNIVERSAL_PREFIX = ".universal_"

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


def trainable_problem(step_dir: Path) -> Optional[str]:
    """Why ``step_dir``'s trainable.safetensors cannot be loaded (missing, truncated, not safetensors), else None.

    Read from the header alone (the tensors' byte ranges against the file's length), so it costs no read of the
    weights and holds for checkpoints written by any version. A crash cannot leave this file short (it is
    renamed into place before ``COMPLETE``); a copy, a sync or a full disk afterwards can.
    """
    path = Path(step_dir) / TRAINABLE_FILE
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + header_len > size:
                return f"{path}: truncated ({size} bytes, shorter than its safetensors header)"
            header = json.loads(fh.read(header_len))
        expected = 8 + header_len + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                                        default=0)
    except FileNotFoundError:
        return f"{path}: missing"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # bad JSON or not a safetensors header
        return f"{path}: not a safetensors file (unreadable header)"
    if size != expected:
        return f"{path}: {'truncated' if size < expected else 'damaged'} ({size} bytes, its header describes {expected})"
    return None


def check_trainable(step_dir: Path) -> None:
    """Refuse, in one line naming the file, a checkpoint whose :func:`trainable_problem` is not None."""
    problem = trainable_problem(step_dir)
    if problem is not None:
        raise UserError(f"{problem}; this checkpoint cannot be loaded")


def find_latest(output_dir) -> Optional[Path]:
    """The checkpoint to resume from: the one ``latest`` names if complete and loadable, else the newest that is.

    A complete checkpoint whose trainable.safetensors is damaged is passed over with a warning naming the file,
    as a ``latest`` that names an interrupted save is; when every complete checkpoint is damaged, the run is
    refused rather than started over on top of them.
    """
    root = checkpoints_root(output_dir)
    latest_file = root / "latest"
    candidates = [step_dir for _, step_dir in reversed(complete_checkpoints(root))]
    if latest_file.is_file():
        tag = latest_file.read_text(encoding="utf-8").strip()
        candidate = root / tag
        if tag and is_complete(candidate):
            candidates.insert(0, candidate)
        else:
            log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest_file, tag)
    damaged: List[str] = []
    for step_dir in dict.fromkeys(candidates):
        problem = trainable_problem(step_dir)
        if problem is None:
            return step_dir
        log.warning("%s; passing over %s for the previous complete checkpoint", problem, step_dir.name)
        damaged.append(problem)
    if damaged:
        raise UserError(f"{damaged[0]}; no earlier complete checkpoint under {root} is loadable either: "
                        f"move {root} aside to start over, or choose another train.output_dir")
    return None


def resolve_step_dir(path) -> Path:
    """Accept an output dir, its ``checkpoints/`` folder, or one ``step_<N>`` dir; return a complete step dir."""
    p = Path(path)
    if _STEP_DIR.match(p.name):
        if not is_complete(p):
            raise UserError(f"{p}: not a complete checkpoint (no {COMPLETE_MARKER} marker; the save was interrupted)")
        check_trainable(p)
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


def save_data_position(step_dir: Path, rank: int, position: Optional[Dict[str, int]]) -> None:
    """This rank's data-stream position (``{"epoch", "offset"}``), when its stream has one."""
    if position is not None:
        write_json_atomic(Path(step_dir) / f"data_position_rank{rank}.json", position)


def load_data_position(step_dir: Path, rank: int) -> Optional[Dict[str, int]]:
    path = Path(step_dir) / f"data_position_rank{rank}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


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

    check_trainable(step_dir)
    return load_file(str(Path(step_dir) / TRAINABLE_FILE))


def write_client_state(step_dir: Path, state: Dict[str, Any]) -> None:
    write_json_atomic(step_dir / CLIENT_STATE_FILE, state)


def read_client_state(step_dir: Path) -> Dict[str, Any]:
    """The step and world size a checkpoint was saved at; a damaged file is a one-line error naming it."""
    path = Path(step_dir) / CLIENT_STATE_FILE
    state = load_json(path)
    missing = [key for key in ("step", "world_size") if not isinstance(state, dict) or key not in state]
    if missing:
        raise DataError(f"{path}: not a client state (no {' or '.join(missing)}); this checkpoint cannot be resumed")
    return state


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



# ---------------------------------------------------------------------------------------------- resume
def _key(cfg: "Config", dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def saved_config(step_dir: Path) -> "Config":
    from gpt4roi_sft.config import load_config

    try:
        return load_config(str(Path(step_dir) / "config.yaml"))
    except UserError as exc:
        raise UserError(f"{step_dir}: its config.yaml cannot be read ({exc}); resume is not possible") from None


def check_resumable(step_dir: Path, cfg: "Config") -> None:
    """Refuse (one line, before anything is loaded or written) a run whose recipe cannot continue ``step_dir``.

    The keys in :data:`RESUME_KEYS`, ``train.engine`` and (for DeepSpeed) the ZeRO stage must be those the
    checkpoint was trained with;
    everything else (learning rate, steps, data, number of processes) may change between jobs.
    """
    from gpt4roi_sft.config import load_deepspeed_json, zero_stage

    saved = saved_config(step_dir)
    for key in RESUME_KEYS:
        old, new = _key(saved, key), _key(cfg, key)
        if old != new:
            raise UserError(f"{cfg.train.output_dir}: its checkpoint {step_dir.name} was trained with {key}={old!r}, "
                            f"this run has {key}={new!r}; the checkpoint cannot continue under another {key}: "
                            f"set it back, or choose another train.output_dir")
    if saved.train.engine != cfg.train.engine:
        raise UserError(f"{cfg.train.output_dir}: its checkpoint {step_dir.name} was saved by train.engine="
                        f"{saved.train.engine}, this run has train.engine={cfg.train.engine}; an engine resumes only "
                        f"its own checkpoints: set it back, or choose another train.output_dir")
    if cfg.train.engine != "deepspeed":
        return
    try:
        old_stage = zero_stage(load_deepspeed_json(saved.deepspeed.config))
    except UserError:
        return  # the DeepSpeed JSON it was trained with is gone; DeepSpeed's loader has the last word
    new_stage = zero_stage(load_deepspeed_json(cfg.deepspeed.config))
    if old_stage != new_stage:
        raise UserError(f"{cfg.train.output_dir}: its checkpoint {step_dir.name} was trained with ZeRO-{old_stage} "
                        f"({saved.deepspeed.config}), this run has ZeRO-{new_stage} ({cfg.deepspeed.config}); "
                        f"resume with the same stage, or choose another train.output_dir")


def check_output_dir(cfg: "Config") -> None:
    """Launch-time check of ``train.output_dir``: a checkpoint there must be one ``cfg`` can continue."""
    step_dir = find_latest(cfg.train.output_dir)
    if step_dir is not None:
        check_resumable(step_dir, cfg)


def completed_step(step_dir: Path, state: Dict[str, Any], cfg: "Config") -> Optional[int]:
    """The step at which the run is already finished under ``cfg``, or ``None`` when there is more to train.

    With ``train.max_steps`` set, the run is finished once the checkpoint reached it; with steps derived from
    epochs, once it reached the total it was saved with and the epoch count is unchanged.
    """
    step = int(state["step"])
    if cfg.train.max_steps >= 1:
        return step if step >= cfg.train.max_steps else None
    saved = saved_config(step_dir)
    if saved.train.max_steps < 1 and saved.train.num_epochs == cfg.train.num_epochs and step >= int(state["total_steps"]):
        return step
    return None


def universal_dir(root: Path, step_dir: Path) -> Path:
    return Path(root) / f"{UNIVERSAL_PREFIX}{step_dir.name}"


def remove_universal(root: Path, step_dir: Path) -> None:
    """Delete the universal copy of ``step_dir`` once loaded (and the ``latest_universal`` the converter writes)."""
    shutil.rmtree(universal_dir(root, step_dir), ignore_errors=True)
    (Path(root) / "latest_universal").unlink(missing_ok=True)


def convert_to_universal(step_dir: Path, out: Path) -> None:
    """Write DeepSpeed's universal checkpoint of ``step_dir`` to ``out`` (rank 0 only; replaces ``out``).

    Runs ``deepspeed.checkpoint.ds_to_universal`` in this process with one worker (no child processes
    beside the training group). A failure is a :class:`UserError`; nothing is left behind.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(step_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    except Exception as exc:  # DeepSpeed's converter raises assertions and plain errors alike
        remove_universal(out.parent, step_dir)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{step_dir}: cannot re-partition this checkpoint for another number of processes "
                        f"({type(exc).__name__}: {reason}); resume on the number it was saved with") from None
    log.info("converted %s to a universal checkpoint for the new number of processes", step_dir)
