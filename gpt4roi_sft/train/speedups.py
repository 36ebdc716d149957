"""Throughput levers that change how a step is computed, never what: each is a switch of the ``model`` section.

* ``model.liger_kernel``: Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU in the LLM's layers, and its fused
  linear cross-entropy for the training loss (the (tokens, vocab) logits are never materialised). CUDA only;
  the CPU keeps plain PyTorch and a CPU run asking for it stops with one line.
* ``model.compile``: regional ``torch.compile`` of the LLM's decoder layers (one graph reused by every layer),
  of the region encoder's multi-level fusion (its convolutions) and of the vision tower's encoder layers; the
  RoIAlign tail stays eager because its shapes change with the number of images and boxes in every batch.
* ``model.channels_last``: the region encoder's convolutions on channels-last activations.

Each function works on the model ``apply_training_mode`` returned (peft-wrapped or not) and returns what the
benchmark needs to switch the lever off again on the same engine; training never switches one off.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from gpt4roi_sft.config import Config
from gpt4roi_sft.errors import UserError
from gpt4roi_sft.model.region_encoder import MultiLevelFuse, RegionEncoder
from gpt4roi_sft.train.modes import decoder_layers, unwrap_base_model

log = logging.getLogger(__name__)

LIGER_REQUIREMENT = "liger-kernel==0.8.5"
_MISSING = object()


def apply_speedups(model: nn.Module, cfg: Config, device: torch.device) -> None:
    """Switch on the recipe's levers (``model.liger_kernel``, ``model.channels_last``, ``model.compile``)."""
    if cfg.model.liger_kernel:
        enable_liger_kernel(model, device)
    if cfg.model.channels_last:
        set_channels_last(model, True)
    if cfg.model.compile:
        compile_regions(model, cfg.model.compile)


# ---------------------------------------------------------------------------------------------------- Liger
def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of ``hidden (N, D) @ weight.T (V, D)`` against ``labels (N,)``, chunked by Liger's kernel
    (fp32 softmax per chunk; the gradients are computed in the forward, so the logits never exist whole).

    A trained output head (full fine-tuning) gets its gradient summed over the chunks in fp32: Liger's default
    sums it in the weight's dtype, bf16, which loses the small chunks' share. A frozen head allocates nothing."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="sum",
                                            accum_dtype=torch.float32)


def enable_liger_kernel(model: nn.Module, device: torch.device) -> Callable[[], None]:
    """Liger's kernels in the LLM of ``model`` and its fused linear cross-entropy as the training loss.

    Returns a function that restores the plain modules (the benchmark times both on one engine). Liger patches
    the LLM's module instances and, for RoPE, its ``transformers`` modeling module, so the switch holds for
    the whole process until undone.
    """
    if device.type != "cuda":
        raise UserError(f"model.liger_kernel=true needs a CUDA GPU (Liger's kernels are Triton); this run is on {device.type}. "
                        "Leave model.liger_kernel=false here")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise UserError(f"model.liger_kernel=true needs the liger-kernel package: pip install '{LIGER_REQUIREMENT}'") from None
    base = unwrap_base_model(model)
    llm = base.language_model
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(llm.config.model_type)
    if apply_fn is None:
        raise UserError(f"model.liger_kernel=true: liger-kernel has no kernels for a {llm.config.model_type!r} language model")
    undo_patch = patch_with_undo(lambda: apply_fn(model=llm, rope=True, rms_norm=True, swiglu=True,
                                                  cross_entropy=False, fused_linear_cross_entropy=False),
                                 modules=list(llm.modules()), namespaces=[sys.modules[type(llm).__module__]])
    base.linear_cross_entropy = liger_linear_cross_entropy
    log.info("Liger kernels on: RMSNorm, RoPE, SwiGLU and fused linear cross-entropy in the %s LLM", llm.config.model_type)

    def undo() -> None:
        undo_patch()
        base.linear_cross_entropy = None

    return undo


def patch_with_undo(patch: Callable[[], None], modules: Sequence[nn.Module], namespaces: Sequence[object]) -> Callable[[], None]:
    """Run ``patch`` and return a function that puts back every attribute it set on ``modules`` (instance
    attributes such as a bound ``forward``) and on ``namespaces`` (module-level functions and classes)."""
    dicts = [m.__dict__ for m in modules] + [vars(ns) for ns in namespaces]
    before = [dict(d) for d in dicts]
    patch()
    changes = []
    for d, old in zip(dicts, before):
        for key in set(d) | set(old):
            previous = old.get(key, _MISSING)
            if d.get(key, _MISSING) is not previous:
                changes.append((d, key, previous))

    def undo() -> None:
        for d, key, previous in changes:
            if previous is _MISSING:
                d.pop(key, None)
            else:
                d[key] = previous

    return undo


# ---------------------------------------------------------------------------------------------------- layout
def set_channels_last(model: nn.Module, enabled: bool) -> None:
    """Channels-last convolutions in every region encoder of ``model`` (peft's trained copy and its original)."""
    for module in model.modules():
        if isinstance(module, RegionEncoder):
            module.channels_last = enabled


# ---------------------------------------------------------------------------------------------------- compile
def compile_regions(model: nn.Module, parts: Sequence[str]) -> Dict[str, List[nn.Module]]:
    """``nn.Module.compile`` (in place: parameter names and checkpoints unchanged) of the chosen parts.

    ``decoder_layers``: every layer of the LLM's decoder (same code, so the compiled graph is shared);
    ``region_encoder``: every :class:`MultiLevelFuse` (the region encoder's convolution stack);
    ``vision_layers``: every layer of the vision tower's encoder (frozen in GPT4RoI's stages: a no-grad graph,
    ~34 dispatched operations per layer otherwise, ~820 a step for CLIP ViT-L's 24). Compilation happens at the
    first forward. Returns ``{part: [compiled modules]}``.
    """
    compiled: Dict[str, List[nn.Module]] = {}
    for part in parts:
        if part == "decoder_layers":
            modules = decoder_layers(model, "model.compile=decoder_layers")
        elif part == "region_encoder":
            modules = [m for m in model.modules() if isinstance(m, MultiLevelFuse)]
        elif part == "vision_layers":
            modules = vision_layers(model, "model.compile=vision_layers")
        else:
            raise UserError(f"model.compile: unknown part {part!r}")
        for module in modules:
            module.compile()
        compiled[part] = modules
        log.info("torch.compile: %d module(s) of %s (compiled at the first forward)", len(modules), part)
    return compiled


def compile_health() -> Dict[str, object]:
    """What ``torch.compile`` did in this process: graphs built, graph breaks, and whether dynamo gave up on a
    function after too many recompiles (it then runs eagerly from there on, silently slower: the number a user
    must see before trusting a compiled run's speed)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hit": any("recompile limit" in reason.lower() for reason in counters["unimplemented"])}


def warn_if_compile_gave_up() -> bool:
    """Log once when dynamo stopped compiling a region (the recompile limit); True if it did."""
    health = compile_health()
    if health["recompile_limit_hit"]:
        import torch._dynamo

        log.warning("torch.compile: dynamo hit its recompile limit (%d) and runs part of the model eagerly from "
                    "there on; TORCH_LOGS=recompiles names the guard that keeps failing", torch._dynamo.config.recompile_limit)
    return health["recompile_limit_hit"]


def vision_layers(model: nn.Module, key: str) -> List[nn.Module]:
    """The vision tower's encoder layers (``vision_model.encoder.layers`` of a CLIP tower) of ``model``."""
    tower = unwrap_base_model(model).vision_tower
    layers = getattr(getattr(getattr(tower, "vision_model", tower), "encoder", None), "layers", None)
    if layers is None:
        raise UserError(f"{key}: the {type(tower).__name__} vision tower has no encoder.layers")
    return list(layers)
