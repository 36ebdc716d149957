"""QLoRA's frozen base: the LLM's linear layers as bitsandbytes 4-bit NF4, everything else left in full.

The vision tower, region encoder, projector and output head stay in full precision (they are small, and
the region encoder and projector train). Quantizing after loading works for every checkpoint layout
``load_model`` reads, without each loader knowing about quantization.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gpt4roi_sft.train.modes import LLM_PREFIX

log = logging.getLogger(__name__)


def quantize_language_model_4bit(model: nn.Module, compute_dtype: torch.dtype, device=None) -> nn.Module:
    """Replace every ``nn.Linear`` under ``language_model`` (but the output head) by a frozen NF4 layer."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the install
        from gpt4roi_sft.errors import ConfigError

        raise ConfigError(f"lora.qlora needs bitsandbytes (pip install -e '.[qlora]'): {exc}") from None
    llm = getattr(model, LLM_PREFIX)
    targets = [(name, mod) for name, mod in llm.named_modules() if isinstance(mod, nn.Linear) and not name.endswith("lm_head")]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            compress_statistics=True,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.float32).cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(compute_dtype).cpu(), requires_grad=False)
        q = q.to(device if device is not None else "cpu")  # moving to a device quantizes the weight
        setattr(parent, leaf, q)
    log.info("QLoRA: %d linear layers of the language model quantized to 4-bit NF4", len(targets))
    return model
