"""Export a training checkpoint as a LoRA adapter (plain ``peft`` loads it) or as merged full weights.

``python -m gpt4roi_sft.export --checkpoint OUTPUT_DIR_OR_STEP_DIR --out DIR [--merge]``

The base model is rebuilt exactly as training built it (same recipe: freeze preset, LoRA wrapping), the
checkpoint's gathered trainable weights are loaded into it, and the result is written with the processor
files beside it. Without ``--merge`` a LoRA run gives an adapter directory (``adapter_config.json``,
``adapter_model.safetensors``, region encoder and projector included through ``modules_to_save``) that
``peft.PeftModel.from_pretrained(load_model(base)[0], DIR)`` restores; with ``--merge``, or after full
fine-tuning, a full model directory that :func:`gpt4roi_sft.load_model` opens.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from gpt4roi_sft.atomic import apply_default_mode, make_temp_dir
from gpt4roi_sft.config import Config, load_config
from gpt4roi_sft.errors import UserError
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


def export_checkpoint(checkpoint: str, out_dir: str, merge: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write the export to ``out_dir`` (through a temporary sibling, renamed at the end); returns it."""
    step_dir = ckpt.resolve_step_dir(checkpoint)
    model, processor, cfg = rebuild_trained_model(step_dir, dtype=dtype)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        if cfg.lora.enabled and merge:
            model = model.merge_and_unload()
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        if cfg.lora.enabled and not merge:
            _point_adapter_at_base(tmp, cfg.model.path)
        apply_default_mode(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s", step_dir, "adapter" if cfg.lora.enabled and not merge else "full model", out)
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
    args = parser.parse_args(argv)
    from gpt4roi_sft.console import setup_cli_logging

    setup_cli_logging()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, dtype=dtype)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    sys.exit(run_cli(main))
