"""``attn_implementation="torch_varlen"``: packed rows through PyTorch's variable-length flash attention.

With ``sdpa``, a packed row runs one attention over the whole row under a block-diagonal mask: the kernel
cannot use flash attention with an arbitrary mask and does the (row x row) work the mask then throws away.
Packed batches from :class:`~gpt4roi_sft.data.collator.PackingCollator` also carry ``cu_seq_lens_q`` (the
samples' boundaries in the flattened batch, int32) and ``max_length_q`` (the longest sample, an int, so
nothing is read back from the device); under ``torch_varlen`` the LLM's attention hands those to
``torch.nn.attention.varlen.varlen_attn``, which attends within each sample only. Everything else (padded
batches, generation with a cache, the vision tower, a row without those fields) runs transformers' ``sdpa``
with the mask transformers builds, so the implementation is never wrong where it is not faster.

transformers would still build that block-diagonal mask for every forward (and read one flag back from the
device to see whether the rows are packed); :func:`skip_mask_building` hands the LLM a placeholder 4D mask
instead, which transformers passes through untouched and the varlen path never reads, so a packed forward
waits for nothing.

The kernel needs CUDA and fp16/bf16; elsewhere each sample goes through ``sdpa`` on its own (the same
result, slowly), which is what the CPU tests exercise. PyTorch changed ``varlen_attn``'s arguments between
releases (``is_causal`` in 2.10, ``window_size`` later); :func:`varlen_kernel` adapts to the one installed.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

TORCH_VARLEN = "torch_varlen"


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             cu_seq_lens_q: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                             **kwargs):
    """transformers' attention-function contract: ``query/key/value (B, H, T, D)`` -> ``((B, T, H, D), None)``.

    Uses the varlen kernel when the batch names its samples (``cu_seq_lens_q`` over the B*T flattened tokens)
    and queries and keys are the same tokens (no cache); otherwise exactly ``sdpa``.
    """
    batch, heads, length, head_dim = query.shape
    if cu_seq_lens_q is None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout and module.training:
        raise ValueError(f"{TORCH_VARLEN} attention has no attention dropout (the LLM's attention_dropout is {dropout})")
    if int(cu_seq_lens_q.shape[0]) < 2:
        raise ValueError(f"{TORCH_VARLEN}: cu_seq_lens_q needs at least 2 entries, got {tuple(cu_seq_lens_q.shape)}")
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head gets its key/value head
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    scale = head_dim ** -0.5 if scaling is None else float(scaling)
    flat = [t.transpose(1, 2).reshape(batch * length, heads, head_dim) for t in (query, key, value)]
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    longest = int(max_length_q) if max_length_q is not None else length
    out = varlen_attention(*flat, cu, longest, causal, scale)
    return out.reshape(batch, length, heads, head_dim), None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int,
                     causal: bool, scale: float) -> torch.Tensor:
    """Attention of ``(N, H, D)`` tokens within each ``cu_seqlens`` segment -> ``(N, H, D)``."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return varlen_kernel()(q, k, v, cu_seqlens, max_length, causal, scale)
    if q.is_cuda:
        _warn_once(f"{TORCH_VARLEN}: the flash kernel needs fp16/bf16, this model runs {q.dtype}; each sample goes "
                   "through sdpa on its own instead (correct, slow)")
    return per_sample_sdpa(q, k, v, cu_seqlens, causal, scale)


def per_sample_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                    scale: float) -> torch.Tensor:
    """The varlen contract one segment at a time through ``scaled_dot_product_attention`` (CPU, fp32)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{TORCH_VARLEN}: cu_seq_lens_q {bounds[:4]}...{bounds[-1]} do not split {q.shape[0]} tokens")
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        seg = [t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, n, D)
        out.append(F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale)[0].transpose(0, 1))
    return torch.cat(out, dim=0)


def skip_mask_building(llm_config, attention_mask: Optional[torch.Tensor], kwargs: dict, cached: bool,
                       like: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``attention_mask`` to hand the LLM: a (1, 1, 1, 1) placeholder when every attention of this forward
    takes the varlen path (``torch_varlen``, the batch names its samples, no mask, no cache), else ``attention_mask``.

    transformers returns a 4D mask as it is, so it neither builds the (B, 1, T, T) block-diagonal mask nor runs
    ``find_packed_sequence_indices`` (a device-to-host read); :func:`varlen_attention_forward` ignores the
    placeholder because it only reaches that function together with ``cu_seq_lens_q`` and equal query/key lengths.
    """
    if (attention_mask is not None or cached or kwargs.get("cu_seq_lens_q") is None
            or getattr(llm_config, "_attn_implementation", None) != TORCH_VARLEN):
        return attention_mask
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=like.device)


@functools.lru_cache(maxsize=1)
def varlen_kernel() -> Callable[..., torch.Tensor]:
    """``f(q, k, v, cu_seqlens, max_length, causal, scale)`` over the installed ``varlen_attn``'s own arguments."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise RuntimeError(f"{TORCH_VARLEN} needs torch.nn.attention.varlen (PyTorch >= 2.10); this is torch "
                           f"{torch.__version__}. Use attn_implementation sdpa") from None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        raise RuntimeError(f"{TORCH_VARLEN}: torch {torch.__version__}'s varlen_attn takes neither window_size nor "
                           f"is_causal ({', '.join(params)}); use attn_implementation sdpa")

    def run(q, k, v, cu_seqlens, max_length, causal, scale):
        kwargs = {}
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if "scale" in params:
            kwargs["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:  # no scale argument: fold it into the queries
            q = q * (scale * q.shape[-1] ** 0.5)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **kwargs)

    return run


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def register() -> None:
    """Make ``torch_varlen`` a transformers attention implementation (kernel, and sdpa's mask for the fallback)."""
    AttentionInterface.register(TORCH_VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(TORCH_VARLEN, sdpa_mask)


register()

__all__ = ["TORCH_VARLEN", "per_sample_sdpa", "register", "skip_mask_building", "varlen_attention", "varlen_attention_forward", "varlen_kernel"]
