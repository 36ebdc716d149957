"""The model and the DeepSpeed engine both arms train: real GPT4RoI-7B shapes or the tiny test model,
built through the project's own trainer path (``apply_training_mode`` + ``build_engine``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from bench.throughput.samples import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger("bench.train_throughput")

ROOT = Path(__file__).resolve().parents[2]
ZERO_CONFIGS = {"1": "ds_configs/zero1.json", "2": "ds_configs/zero2.json", "3": "ds_configs/zero3.json",
                "3_offload": "ds_configs/zero3_offload.json"}


def real_config(image_size: int, attn: str):
    """GPT4RoI-7B shapes: Vicuna-7B + CLIP ViT-L/14 at ``image_size`` + GPT4RoI's region encoder defaults.

    The vocabulary stays at LLaMA's 32000; ``<image>`` and ``<bbox>`` take its last two ids (the weights
    are random, so which rows they use does not matter for speed).
    """
    from gpt4roi_sft.model.configuration import GPT4RoIConfig

    config = GPT4RoIConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=image_size,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            tie_word_embeddings=False,
        ),
        projector_type="linear",
        image_token_id=31998,
        bbox_token_id=31999,
    )
    config._attn_implementation = attn
    return config


def tiny_bench_config(attn: str):
    """The tiny test model's config (``gpt4roi_sft.model.tiny``), with the synthetic vocabulary's token ids."""
    from gpt4roi_sft.model.tiny import tiny_config

    config = tiny_config(vocab_size=1200, image_token_id=3, bbox_token_id=4, pad_token_id=PAD_ID)
    config._attn_implementation = attn
    return config


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights allocated directly on ``device`` in ``dtype`` (a 7B model never exists in fp32 or on CPU)."""
    from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT4RoIForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def init_single_process_group(on_cpu: bool, port: Optional[int]):
    """A one-process group, as ``train_sft.py`` makes when no launcher set ``WORLD_SIZE``; returns its
    :class:`~gpt4roi_sft.train.distributed.Collectives`, as the trainer's optimizer step takes them.

    ``port`` (``--port``) wins over an inherited ``MASTER_PORT``; without either, a free port.
    """
    from gpt4roi_sft.train.distributed import one_process_port, start_process_group

    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ["MASTER_PORT"] = str(port) if port else one_process_port()
    return start_process_group("cpu" if on_cpu else "cuda", "gloo" if on_cpu else "nccl")


def training_config(args, ds_config_path: str):
    """The typed recipe the trainer would read for this benchmark (LoRA or full fine-tuning)."""
    from gpt4roi_sft.config import load_config

    overrides = [
        f"train.micro_batch_size={args.micro_batch}",
        f"train.gradient_accumulation_steps={args.grad_accum}",
        f"train.precision={args.precision}",
        "train.lr_scheduler=constant",
        f"train.engine={args.engine}",
        f"deepspeed.config={ds_config_path}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"model.checkpoint_every={args.checkpoint_every if args.gradient_checkpointing else 1}",
        "model.freeze=stage2",  # GPT4RoI stage 2: everything but the vision tower
    ]
    if args.ds_override:
        overrides.append("deepspeed.overrides=" + json.dumps(list(args.ds_override)))
    if not args.full_ft:
        overrides += ["lora.enabled=true", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", "lora.target_modules=all-linear",
                      f"lora.dropout={args.lora_dropout}"]
    return load_config(None, overrides)


def deepspeed_config_path(args, workdir: Path) -> str:
    """The repository's ZeRO JSON; with ``--client-optimizer`` an offload config loses its DeepSpeed optimizer.

    DeepSpeed's CPU Adam compiles a C++ extension on first use (minutes on a bare GPU machine); the client
    ``torch.optim.AdamW`` that ``build_engine`` supplies needs no build.
    """
    path = ROOT / ZERO_CONFIGS[args.zero]
    if not (args.client_optimizer and args.zero == "3_offload"):
        return str(path)
    ds = json.loads(path.read_text())
    ds.pop("optimizer", None)
    ds["zero_force_ds_cpu_optimizer"] = False
    out = workdir / "zero3_offload_client_optimizer.json"
    out.write_text(json.dumps(ds, indent=1))
    return str(out)


def prepare_engine(model, args, on_cpu: bool, workdir: Path):
    """``apply_training_mode`` then ``build_engine``: exactly the objects ``train_sft.py`` trains (with
    ``args.engine == "torch"``, the trainer's ``train.engine=torch`` engine instead; stage None)."""
    from gpt4roi_sft.train.loop import build_engine, build_torch_engine
    from gpt4roi_sft.train.modes import (apply_training_mode, enable_activation_checkpointing,
                                         trainable_parameter_count, unwrap_base_model)

    cfg = training_config(args, deepspeed_config_path(args, workdir))
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model, cfg.model.checkpoint_every)
    model = apply_training_mode(model, cfg)
    counts = trainable_parameter_count(model)
    log.info("parameters: %d total, %d trainable", counts["total"], counts["trainable"])
    total_steps = args.warmup + args.steps + 64
    if args.engine == "torch":
        engine, _, _ = build_torch_engine(model, cfg, total_steps, next(model.parameters()).device)
        counts.update(optimizer="torch.optim.AdamW", fused_adamw=True)
        return engine, None, counts
    hidden = unwrap_base_model(model).config.text_config.hidden_size
    engine, _, stage = build_engine(model, cfg, 1, hidden, total_steps, on_cpu)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    counts["optimizer"] = f"{type(inner).__module__}.{type(inner).__name__}"
    counts["fused_adamw"] = bool(getattr(inner, "defaults", {}).get("fused"))
    return engine, stage, counts
