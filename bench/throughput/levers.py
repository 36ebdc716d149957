"""Arms as (batching, levers, token budget), and switching the levers on and off on one engine, step by step.

An arm spec reads ``NAME=COLLATE[+LEVER...][@BUDGET]``: ``COLLATE`` is ``padded`` (PaddingCollator, the
transformers-style baseline) or ``packed`` (PackingCollator rows, widths rounded to ``--pad-to-multiple``);
``@BUDGET`` gives the arm its own token budget per micro-batch (default: the run's ``--pack-tokens``, or
``--micro-batch`` samples). Levers, each the benchmark's twin of a recipe switch:

=================  ===========================================  ==========================================
lever              what the arm's steps run with                recipe switch
=================  ===========================================  ==========================================
``nodrop``         LoRA dropout modules replaced by identity    ``lora.dropout=0``
``liger``          Liger RMSNorm/RoPE/SwiGLU + fused linear CE  ``model.liger_kernel=true``
``channels_last``  region-encoder convs on NHWC activations     ``model.channels_last=true``
``compile``        regional torch.compile (decoder layers, the  ``model.compile=decoder_layers,region_encoder,``
                   region encoder's convolution stack, the      ``vision_layers``
                   vision tower's layers)
``ds_sync_free``   DeepSpeed's throughput timer (a device sync  ``deepspeed.overrides=timers.throughput.enabled=false,``
                   at every forward and step) and bf16          ``bf16.check_grad_overflow=false``
                   overflow check (one more) off
``varlen``         packed rows' attention through PyTorch's     ``model.attn_implementation=torch_varlen``
                   varlen flash kernel (no block-diagonal mask)
``ds_nocontig``    ZeRO-2 without contiguous gradients: one     ``deepspeed.overrides=zero_optimization.``
                   copy per gradient instead of two (bucket     ``contiguous_gradients=false``
                   and partition buffers), fewer views (1 GPU)
=================  ===========================================  ==========================================

The library's own functions (``gpt4roi_sft.train.speedups``) switch Liger, compile and channels-last on, so the
benchmark times exactly what training runs; the switches back off exist only here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional

import torch
from torch import nn

from gpt4roi_sft.config import COMPILE_PARTS

log = logging.getLogger("bench.train_throughput")

LEVERS = ("nodrop", "liger", "channels_last", "compile", "ds_sync_free", "varlen", "ds_nocontig")
COMPILED_PARTS = COMPILE_PARTS  # the compile lever compiles every part model.compile can name
COLLATES = ("padded", "packed")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    collate: str
    levers: FrozenSet[str] = field(default_factory=frozenset)
    budget: Optional[int] = None  # tokens per micro-batch; None: the run's default grouping

    def describe(self) -> str:
        text = "+".join([self.collate, *sorted(self.levers)])
        return text + (f"@{self.budget}" if self.budget else "")


def parse_arm(spec: str) -> ArmSpec:
    """``"liger=packed+nodrop+liger@8192"`` -> ArmSpec; raises ValueError naming the bad part."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"arm {spec!r}: expected NAME=COLLATE[+LEVER...][@BUDGET]")
    rest, at, budget = rest.partition("@")
    collate, *levers = [p.strip() for p in rest.split("+")]
    if collate not in COLLATES:
        raise ValueError(f"arm {spec!r}: collate {collate!r} is not one of {', '.join(COLLATES)}")
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise ValueError(f"arm {spec!r}: unknown lever(s) {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    if collate == "padded" and levers:
        raise ValueError(f"arm {spec!r}: the padded baseline runs without levers")
    try:
        tokens = int(budget) if at else None
    except ValueError:
        raise ValueError(f"arm {spec!r}: budget {budget!r} is not a number of tokens") from None
    return ArmSpec(name.strip(), collate, frozenset(levers), tokens)


def parse_arms(specs: List[str]) -> List[ArmSpec]:
    arms = [parse_arm(s) for s in specs]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    return arms


class LeverSwitch:
    """Sets the levers of the arm about to run on ``engine`` (the benchmark's one DeepSpeed engine).

    ``set(levers)`` switches on what the arm has and the current state lacks, and off the reverse. A lever that
    cannot run here (Liger without CUDA) raises from ``set``; the caller drops that arm.
    """

    def __init__(self, engine, device: torch.device):
        self.engine = engine
        self.device = device
        self.active: FrozenSet[str] = frozenset()
        self._liger_undo = None
        self._compiled: Optional[List[nn.Module]] = None
        self._compiled_calls: Dict[int, object] = {}
        self._dropouts = [(m.lora_dropout, key, drop) for m in engine.module.modules()
                          if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
                          for key, drop in m.lora_dropout.items() if not isinstance(drop, nn.Identity)]
        self._timer_config = getattr(getattr(engine, "tput_timer", None), "config", None)
        self._overflow_check = getattr(engine.optimizer, "check_grad_overflow", None)
        self._contiguous = getattr(engine.optimizer, "contiguous_gradients", None)
        self._attn_configs = attention_configs(engine.module)
        self._attn_saved = {k: c._attn_implementation for k, c in self._attn_configs.items()}

    def set(self, levers: FrozenSet[str]) -> None:
        for lever in sorted(self.active - levers):
            self._switch(lever, False)
            self.active = self.active - {lever}
        for lever in sorted(levers - self.active):
            self._switch(lever, True)
            self.active = self.active | {lever}

    def _switch(self, lever: str, on: bool) -> None:
        from gpt4roi_sft.train import speedups

        if lever == "nodrop":
            for holder, key, drop in self._dropouts:
                holder[key] = nn.Identity() if on else drop
        elif lever == "liger":
            if on:
                self._liger_undo = speedups.enable_liger_kernel(self.engine.module, self.device)
            elif self._liger_undo is not None:
                self._liger_undo()
                self._liger_undo = None
        elif lever == "channels_last":
            speedups.set_channels_last(self.engine.module, on)
        elif lever == "compile":
            if self._compiled is None and on:
                parts = speedups.compile_regions(self.engine.module, COMPILED_PARTS)
                self._compiled = [m for modules in parts.values() for m in modules]
                self._compiled_calls = {id(m): m._compiled_call_impl for m in self._compiled}
            for m in self._compiled or []:
                m._compiled_call_impl = self._compiled_calls[id(m)] if on else None
        elif lever == "ds_sync_free":
            timer = getattr(self.engine, "tput_timer", None)
            if timer is not None and self._timer_config is not None:
                timer.config = self._timer_config.model_copy(update={"enabled": False}) if on else self._timer_config
            if self._overflow_check is not None:
                self.engine.optimizer.check_grad_overflow = False if on else self._overflow_check
        elif lever == "ds_nocontig":
            # ZeRO-2's optimizer reads the flag in every gradient hook and reduction, and its buckets are empty
            # between steps, so it can change between steps: the same code path (and the same losses) as an engine
            # built with it off. ZeRO-1 built without it installs no gradient hooks at all, which a switch cannot
            # undo: time that as its own setting (--zero 1 --ds-override zero_optimization.contiguous_gradients=false).
            from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

            optimizer = self.engine.optimizer
            if not (isinstance(optimizer, DeepSpeedZeroOptimizer) and optimizer.partition_gradients):
                raise RuntimeError("ds_nocontig switches ZeRO-2 only; for ZeRO-1 pass --ds-override "
                                   "zero_optimization.contiguous_gradients=false to its own run")
            optimizer.contiguous_gradients = False if on else self._contiguous
        elif lever == "varlen":
            from gpt4roi_sft.model.varlen_attention import TORCH_VARLEN

            for k, c in self._attn_configs.items():
                c._attn_implementation = TORCH_VARLEN if on else self._attn_saved[k]


def attention_configs(model: nn.Module) -> Dict[int, object]:
    """Every config of ``model``'s modules (and their text/vision sub-configs) by id: transformers reads
    ``config._attn_implementation`` at every forward (kernel and mask alike), so setting it there switches the
    attention of the next step."""
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)] if c is not None}
    for c in list(configs.values()):
        for sub in ("text_config", "vision_config"):
            if getattr(c, sub, None) is not None:
                configs[id(getattr(c, sub))] = getattr(c, sub)
    return configs


def lever_settings(spec: ArmSpec) -> Dict[str, object]:
    """The recipe keys an arm's levers correspond to, for the results JSON."""
    return {
        "lora.dropout=0": "nodrop" in spec.levers,
        "model.liger_kernel": "liger" in spec.levers,
        "model.channels_last": "channels_last" in spec.levers,
        "model.compile": list(COMPILED_PARTS) if "compile" in spec.levers else [],
        "deepspeed.overrides": ((["timers.throughput.enabled=false", "bf16.check_grad_overflow=false"]
                                 if "ds_sync_free" in spec.levers else [])
                                + (["zero_optimization.contiguous_gradients=false"] if "ds_nocontig" in spec.levers else [])),
        "model.attn_implementation": "torch_varlen" if "varlen" in spec.levers else None,
        "data.pack_tokens": spec.budget,
        "collate": spec.collate,
    }


__all__ = ["ArmSpec", "LEVERS", "LeverSwitch", "attention_configs", "lever_settings", "parse_arm", "parse_arms"]
