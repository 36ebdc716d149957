"""The fast decode path of evaluation: ``transformers``' static KV cache with a compiled decode step.

Eager ``generate`` grows a dynamic KV cache by concatenation and launches every layer's kernels from Python,
one step at a time; on a 7B model that leaves the GPU idle most of each decode step (58-110 ms measured on an
H200 through unmerged LoRA layers, against ~4 ms of weight reads). The fast path is still ``transformers``' own
``generate`` (prefill, logits processors, stop strings, sampling are unchanged), run with:

- a :class:`~transformers.StaticCache` that a :class:`StaticCacheSlot` keeps between calls: allocated once,
  at fixed addresses, reset per call. A call with fewer rows than the cache is padded with copies of its last
  row, so the decode step has one shape all run long;
- ``compile_config``: ``generate`` compiles the language model's forward for the decode steps
  (``torch.compile``, ``mode="reduce-overhead"``: CUDA graphs); the prefill stays eager, since its length
  varies from batch to batch;
- stop strings and EOS end a row; ``generate`` returns as soon as every row has ended. Rows that end early
  ride along until then (no re-batching of the survivors); sorting prompts by length keeps their answers'
  lengths close too.

The image and region tokens are embedded once, before the prefill (``GPT4RoIForCausalLM.generate``); the
decode steps see token ids only. Rows that ask about the same image (a test file that asks about several
regions of each image; :meth:`RegionCaptioner.plan` puts them in one batch) share that image's vision tower
and region-encoder maps, and the prefill of their prompt up to the first region token
(``share_prefix``): at 7B and 224 px a region's prompt costs ~4.4 TFLOP of prefill and its image ~2.3 TFLOP
of vision tower and region maps, against ~0.15 TFLOP for the region and the text after it.

The memory arithmetic (:func:`rows_for_memory`) picks how many prompts one batch holds: a token budget of
KV-cache slots (2 x layers x KV heads x head dim per token) plus the prefill's activations, from the free
device memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)

# Rows per batch when the device cannot say how much memory is free (the CPU).
CPU_ROWS = 8


@dataclass
class FastDecoding:
    """Settings of the fast decode path.

    compile: compile the decode step (``None``: on CUDA only; compiling on the CPU costs more than it saves
    for short runs). compile_mode: ``torch.compile`` mode; ``reduce-overhead`` records CUDA graphs.
    max_rows: most prompts per batch. memory_fraction: share of the free device memory a batch may take.
    length_multiple: the cache length is rounded up to a multiple of this, so prompts of nearby lengths share
    one cache (and one compiled decode step). share_prefix: rows of one image share its vision tower and region
    maps, and the prefill of the prompt up to the first region token (``GPT4RoIForCausalLM.generate``).
    """

    compile: Optional[bool] = None
    compile_mode: str = "reduce-overhead"
    max_rows: int = 256
    memory_fraction: float = 0.85
    length_multiple: int = 64
    share_prefix: bool = True


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token holds: keys and values of every layer (7B Llama in bf16: 512 KiB)."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * heads * head_dim * _itemsize(dtype)


def prefill_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Peak activations of one prompt token during the prefill, one layer at a time (no autograd):
    the residual stream, q/k/v/attention output, and the MLP's gate, up and product (an upper estimate)."""
    return (6 * text_config.hidden_size + 3 * text_config.intermediate_size) * _itemsize(dtype)


def vision_bytes_per_image(vision_config, dtype: torch.dtype) -> int:
    """The vision tower's hidden states of one image, all of which the region encoder may read."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    return (vision_config.num_hidden_layers + 1) * patches * vision_config.hidden_size * _itemsize(dtype)


def rows_for_memory(free_bytes: int, prompt_tokens: int, new_tokens: int, config, dtype: torch.dtype,
                    max_rows: int, length_multiple: int = 1) -> int:
    """How many prompts of ``prompt_tokens`` (the longest of the batch) fit in ``free_bytes`` with room for
    ``new_tokens`` each: the KV cache of the rounded-up cache length, plus prefill activations and the vision
    tower's hidden states per row. At least 1, at most ``max_rows``; a multiple of 8 from 8 rows on."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cache_len = round_up(prompt_tokens + new_tokens, length_multiple)
    per_row = cache_len * kv_bytes_per_token(text, dtype) + prompt_tokens * prefill_bytes_per_token(text, dtype)
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        per_row += vision_bytes_per_image(vision, dtype)
    rows = max(1, min(max_rows, int(free_bytes // per_row)))
    return rows - rows % 8 if rows >= 8 else rows


def available_bytes(device: torch.device, held: int = 0) -> Optional[int]:
    """Device memory a new batch may use: free memory, memory the allocator holds unused, and ``held`` (a
    cache about to be replaced). ``None`` off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + idle + held


class StaticCacheSlot:
    """The one static KV cache a captioner decodes into: grown when a call needs more rows or length,
    never shrunk, so that every batch of a run (the last, shorter one padded) reuses one compiled decode step."""

    def __init__(self, settings: FastDecoding):
        self.settings = settings
        self.cache = None
        self.rows = 0
        self.length = 0

    @property
    def held_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers if getattr(layer, "is_initialized", False)
                   for t in (layer.keys, layer.values))

    def fit(self, language_model, rows: int, length: int) -> Tuple[object, int]:
        """A reset cache for ``rows`` prompts of up to ``length`` tokens (prompt + new); returns
        ``(cache, cache_rows)``: the call must pad its batch to ``cache_rows`` rows."""
        from transformers import StaticCache

        if self.cache is None or rows > self.rows or length > self.length:
            self.rows = max(rows, self.rows)
            self.length = max(round_up(length, self.settings.length_multiple), self.length)
            self.cache = None  # free the old tensors before the new ones are allocated
            self.cache = StaticCache(config=language_model.config, max_cache_len=self.length)
            logger.info("static KV cache: %d rows x %d tokens", self.rows, self.length)
        else:
            with torch.inference_mode():  # the tensors were made under generation's inference mode
                self.cache.reset()
        return self.cache, self.rows

    def generate_kwargs(self, language_model, rows: int, length: int) -> Tuple[dict, int]:
        """``generate`` arguments of the fast path for a batch of ``rows`` prompts and ``length`` tokens
        (prompt + new), and the rows the batch must be padded to."""
        from transformers import CompileConfig

        cache, cache_rows = self.fit(language_model, rows, length)
        device = next(language_model.parameters()).device
        compile_step = self.settings.compile if self.settings.compile is not None else device.type == "cuda"
        kwargs = {"cache": cache, "share_prefix": self.settings.share_prefix}
        if compile_step:
            config = CompileConfig(mode=self.settings.compile_mode)
            config._compile_all_devices = device.type != "cuda"  # transformers compiles on CUDA-like devices only
            kwargs["compile_config"] = config
        else:
            kwargs["disable_compile"] = True
        return kwargs, cache_rows


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["FastDecoding", "StaticCacheSlot", "kv_bytes_per_token", "prefill_bytes_per_token",
           "vision_bytes_per_image", "rows_for_memory", "available_bytes", "CPU_ROWS"]
