"""Export a training checkpoint as a LoRA adapter (plain ``peft`` loads it) or as merged full weights.

``python -m gpt4roi_sft.export --checkpoint OUTPUT_DIR_OR_STEP_DIR --out DIR [--merge]``

The base model is rebuilt exactly as training built it (same recipe: freeze preset, LoRA wrapping), the
checkpoint's gathered trainable weights are loaded into it, and the result is written with the processor
files beside it. Without ``--merge`` a LoRA run gives an adapter directory (``adapter_config.json``,
``adapter_model.safetensors``, region encoder and projector included through ``modules_to_save``) that
``peft.PeftModel.from_pretrained(load_model(base)[0], DIR)`` restores; with ``--merge``, or after full
fine-tuning, a full model directory that :func:`gpt4roi_sft.load_model` opens.

Beside the weights, ``export_info.json`` records the checkpoint (its path and training step) and the list of
files the export wrote, so evaluation reports can say which step they measured.

Nothing already written is lost: the export is built in a temporary sibling folder and renamed into place,
and an ``--out`` that holds anything is refused unless ``--overwrite``. With ``--overwrite``, a folder that
holds only what an earlier export wrote (the files its ``export_info.json`` lists) is replaced; any other
folder (a model directory, or an export with files added since) is first renamed aside to
``<out>.replaced-<time>`` and kept, because the export never deletes a file it did not write.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from gpt4roi_sft.atomic import apply_default_modes_under, make_temp_dir, write_json_atomic
from gpt4roi_sft.config import Config, load_config
from gpt4roi_sft.errors import UserError
from gpt4roi_sft.provenance import EXPORT_INFO_FILE, export_info
from gpt4roi_sft.train import checkpoint as ckpt
from gpt4roi_sft.train.modes import apply_training_mode, load_model_from_config

log = logging.getLogger(__name__)


def rebuild_trained_model(step_dir: Path, cfg: Optional[Config] = None, dtype: torch.dtype = torch.float32):
    """The model as training held it at ``step_dir`` (peft-wrapped for LoRA), plus its processor."""
    cfg = cfg or load_config(str(step_dir / "config.yaml"))
    model, processor = load_model_from_config(cfg, dtype)
    # QLoRA adapters are exported onto a full-precision base (merging into 4-bit weights loses precision).
    cfg.lora.qlora = False
    model = apply_training_mode(model, cfg)
    state = ckpt.load_trainable(step_dir)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - {n for n, _ in model.named_parameters()})
    if missing or unexpected:
        raise UserError(
            f"{step_dir / ckpt.TRAINABLE_FILE} does not match the model rebuilt from {cfg.model.path}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model, processor, cfg


def _files_under(folder: Path) -> List[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _is_earlier_export(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the files its ``export_info.json`` says an export wrote."""
    info = export_info(folder)
    if not info or not isinstance(info.get("files"), list):
        return False
    return set(_files_under(folder)) <= set(info["files"]) | {EXPORT_INFO_FILE}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` without ``overwrite``, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        kind = "an earlier export" if _is_earlier_export(out) else "files this export did not write"
        raise UserError(f"--out {out}: not empty (it holds {kind}); pass --overwrite to replace it, "
                        f"or choose another folder")


def _install(tmp: Path, out: Path) -> Optional[Path]:
    """Rename the finished ``tmp`` to ``out``; returns where a non-export ``out`` was moved aside, if anywhere."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # rename(2) replaces an empty directory
        return None
    if _is_earlier_export(out):
        old = make_temp_dir(out.parent, out.name + ".old")
        os.replace(out, old / "export")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return None
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(out, aside)
    os.replace(tmp, out)
    return aside


def export_checkpoint(checkpoint: str, out_dir: str, merge: bool = False, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False) -> Path:
    """Write the export to ``out_dir`` (through a temporary sibling, renamed at the end); returns it.

    A non-empty ``out_dir`` is refused unless ``overwrite`` (see the module docstring for what is replaced and
    what is moved aside).
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    step_dir = ckpt.resolve_step_dir(checkpoint)
    model, processor, cfg = rebuild_trained_model(step_dir, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        if cfg.lora.enabled and merge:
            model = model.merge_and_unload()
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        if cfg.lora.enabled and not merge:
            _point_adapter_at_base(tmp, cfg.model.path)
        state = ckpt.read_client_state(step_dir)
        kind = "adapter" if cfg.lora.enabled and not merge else "full model"
        write_json_atomic(tmp / EXPORT_INFO_FILE, {
            "checkpoint": str(step_dir.resolve()), "step": int(state["step"]), "kind": kind,
            "base_model": str(Path(cfg.model.path).resolve()),
            "files": _files_under(tmp) + [EXPORT_INFO_FILE]})
        apply_default_modes_under(tmp)
        aside = _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        log.warning("%s held files no export wrote; moved them to %s", out, aside)
    log.info("exported %s (%s, step %d) to %s", step_dir, kind, state["step"], out)
    return out


def _point_adapter_at_base(adapter_dir: Path, base_path: str) -> None:
    import json

    cfg_path = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(Path(base_path).resolve())
    cfg_path.write_text(json.dumps(data, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a gpt4roi_sft checkpoint as a LoRA adapter or a full model.")
    parser.add_argument("--checkpoint", required=True, help="a training output dir (its latest checkpoint) or a step_<N> dir")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--merge", action="store_true", help="merge LoRA weights into the base and write a full model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (an earlier export is replaced; anything else is moved aside "
                             "to <out>.replaced-<time>, never deleted)")
    args = parser.parse_args(argv)
    from gpt4roi_sft.console import setup_cli_logging

    setup_cli_logging()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, dtype=dtype, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    sys.exit(run_cli(main))
