"""Fill a DeepSpeed JSON's ``"auto"`` values from the recipe, so one file serves every recipe."""

from __future__ import annotations

import copy
from typing import Any, Dict

from gpt4roi_sft.config import Config
from gpt4roi_sft.errors import ConfigError


def _fill(node: Dict[str, Any], key: str, value: Any) -> None:
    """Replace ``node[key]`` when it is ``"auto"``; a key the JSON leaves out keeps DeepSpeed's default."""
    if node.get(key) == "auto":
        node[key] = value


def fill_auto_values(ds_config: Dict[str, Any], cfg: Config, world_size: int, hidden_size: int) -> Dict[str, Any]:
    """Return a copy of ``ds_config`` with every ``"auto"`` replaced by the recipe's value.

    Explicit numbers in the JSON must agree with the recipe where both exist (a silent disagreement would
    train with a batch size the user did not ask for).
    """
    ds = copy.deepcopy(ds_config)
    micro, gas = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    for key, want in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
        ("train_batch_size", micro * gas * world_size),
    ):
        if ds.get(key, "auto") not in ("auto", want):
            raise ConfigError(f"{cfg.deepspeed.config}: {key}={ds[key]} disagrees with the recipe ({want}); use \"auto\"")
        ds[key] = want
    ds["gradient_clipping"] = cfg.train.max_grad_norm if ds.get("gradient_clipping", "auto") == "auto" else ds["gradient_clipping"]
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    _fill(bf16, "enabled", cfg.train.precision == "bf16")
    if ds.get("fp16", {}).get("enabled") in ("auto",):
        ds["fp16"]["enabled"] = False
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", cfg.train.learning_rate)
        _fill(params, "weight_decay", cfg.train.weight_decay)
    zero = ds.setdefault("zero_optimization", {})
    # HF's rule for ZeRO-3 bucket sizes, with a floor so tiny models do not pay one collective per tensor.
    _fill(zero, "reduce_bucket_size", max(hidden_size * hidden_size, 50_000_000))
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{cfg.deepspeed.config}: no recipe value for \"auto\" key(s): {', '.join(leftover)}")
    return ds


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node
