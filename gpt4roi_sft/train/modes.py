"""What trains: the recipe's base model, GPT4RoI's freeze presets, LoRA (peft) and QLoRA, applied the same way at
train and export time.

Export rebuilds the exact module tree training saved (same model loading, same presets, same LoRA wrapping), so
parameter names in a checkpoint always line up with the model export builds.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, List

import torch
from torch import nn

from gpt4roi_sft.config import Config
from gpt4roi_sft.errors import UserError

log = logging.getLogger(__name__)

# Top-level sub-modules of GPT4RoIForCausalLM, by the part of the architecture they are.
VISION_PREFIX = "vision_tower"
REGION_PREFIX = "region_encoder"
PROJECTOR_PREFIX = "multi_modal_projector"
LLM_PREFIX = "language_model"


def load_model_from_config(cfg: Config, torch_dtype: torch.dtype):
    """``(model, processor)`` of the recipe's ``model`` section (path, vision tower, attention), in ``torch_dtype``."""
    from gpt4roi_sft.model.loading import load_model

    return load_model(cfg.model.path, vision_tower=cfg.model.vision_tower or None, torch_dtype=torch_dtype,
                      attn_implementation=cfg.model.attn_implementation)


def _part(name: str) -> str:
    for prefix in (VISION_PREFIX, REGION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX):
        if name == prefix or name.startswith(prefix + ".") or f".{prefix}." in name:
            return prefix
    return "other"


def apply_freeze_preset(model: nn.Module, preset: str) -> None:
    """Set ``requires_grad`` by preset: ``none`` trains everything, the vision tower included;
    ``stage1`` trains the region encoder only (GPT4RoI stage 1); ``stage2`` trains
    everything but the vision tower (GPT4RoI stage 2); ``llm`` freezes the LLM too (region encoder + projector).
    """
    trainable = {
        "none": {VISION_PREFIX, REGION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX, "other"},
        "stage1": {REGION_PREFIX},
        "stage2": {REGION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX, "other"},
        "llm": {REGION_PREFIX, PROJECTOR_PREFIX},
    }[preset]
    for name, param in model.named_parameters():
        # Quantized (integer) weights of a QLoRA base can never train.
        param.requires_grad_(_part(name) in trainable and param.is_floating_point())


def lora_target_regex(model: nn.Module, spec: str) -> str:
    """A peft ``target_modules`` regex matching the chosen linear layers of the LLM only.

    ``all-linear`` takes every ``nn.Linear`` of the LLM except the output head; otherwise ``spec`` is a
    comma-separated list of leaf names (``q_proj,v_proj``). The vision tower, region encoder and projector are
    never LoRA targets: they are either frozen or trained in full through ``modules_to_save``.
    """
    if spec == "all-linear":
        leaves = set()
        for name, module in model.named_modules():
            if _part(name) == LLM_PREFIX and isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                leaves.add(name.rsplit(".", 1)[-1])
    else:
        leaves = {s.strip() for s in spec.split(",") if s.strip()}
    if not leaves:
        raise ValueError(f"lora.target_modules={spec!r} matches no linear layer of the language model")
    alternation = "|".join(sorted(re.escape(leaf) for leaf in leaves))
    return rf".*{LLM_PREFIX}\..*\.({alternation})"


def apply_training_mode(model: nn.Module, cfg: Config) -> nn.Module:
    """Freeze by preset, then wrap with LoRA when enabled; returns the module to train."""
    apply_freeze_preset(model, cfg.model.freeze)
    if not cfg.lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    if cfg.lora.qlora:
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing is the trainer's (enable_activation_checkpointing: non-reentrant, the layers
        # model.checkpoint_every picks); peft's, for a base marked as loaded in k-bit, would switch every layer
        # back on with its own checkpoint arguments.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Under LoRA the LLM base is frozen; the region encoder / projector train in full as modules_to_save.
    present = {n.split(".")[0] for n, _ in model.named_children()}
    modules_to_save = [m for m in cfg.lora.modules_to_save if m in present]
    missing = sorted(set(cfg.lora.modules_to_save) - present)
    if missing:
        log.warning("lora.modules_to_save: the model has no module(s) %s; skipped", ", ".join(missing))
    if cfg.model.freeze == "stage1":
        modules_to_save = [m for m in modules_to_save if m == REGION_PREFIX]
    lora_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(model, cfg.lora.target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def trainable_parameter_count(model: nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def trainable_names(model: nn.Module) -> List[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def unwrap_base_model(model: nn.Module) -> nn.Module:
    """The GPT4RoI model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module, key: str) -> List[nn.Module]:
    """The LLM's decoder layers of ``model`` (peft-wrapped or not); ``key`` names the recipe key that needs them."""
    base = unwrap_base_model(model)
    layers = getattr(base.language_model.get_decoder(), "layers", None)
    if layers is None:
        raise UserError(f"{key}: the {type(base.language_model).__name__} decoder has no .layers")
    return list(layers)


def enable_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Non-reentrant activation checkpointing, of only every ``every``-th LLM decoder layer (0, every, 2 x every...).

    Checkpointing half the layers keeps about half the activations of none for half the recompute of all, so a
    token budget between the two fits. transformers' own ``every_n_layers`` counts the vision tower's layers as
    well, so the LLM layers it picks would move with the vision depth; this counts from the LLM's first layer.
    Other checkpointable modules (a trained vision tower) stay as ``gradient_checkpointing_enable`` sets them.
    Returns the number of decoder layers checkpointed.
    """
    base = unwrap_base_model(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    layers = decoder_layers(base, "model.checkpoint_every")
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    chosen = sum(1 for layer in layers if layer.gradient_checkpointing)
    log.info("activation checkpointing: %d of %d decoder layers", chosen, len(layers))
    return chosen


def model_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32
