"""Model FLOPs of a GPT4RoI training step, and MFU against a dense peak and against a measured matmul rate.

Accounting (model FLOPs, not hardware FLOPs: activation-checkpoint recompute and padding never count):

* LLM, per token: ``4 N_frozen`` (forward 2N + input-gradient 2N; no weight gradient) + ``6 N_trained``
  (LoRA adapters, or every matmul weight under full fine-tuning) + attention ``12 L H Q T`` where ``T``
  is the length of the sample the token belongs to (per-sample lengths in packed rows; the causal
  half is not discounted, as in PaLM / nanoGPT / torchtitan). ``N`` counts matmul weights only: the
  input-embedding table is a lookup and norms are elementwise.
* Vision tower (frozen, under ``no_grad``), per image: forward only, ``2 N_v T_v + 4 L_v d_v T_v^2``
  with ``T_v`` patches + CLS.
* Projector: trained, ``6 N_proj`` per image token.
* Region encoder: trained, 3x its forward. Its forward is *not* negligible at GPT4RoI's defaults:
  five rounds of 3x3 convs C->C over four maps of 8G..G pixels (G the patch grid) cost about
  2 TFLOP per image at 224 px (4.6 at 336), against ~0.16 TFLOP for the whole ViT-L forward, so it is
  counted conv by conv (``region_encoder_forward_flops``) rather than as ``6N``.

Everything is summed per sample and then spread over the sample's tokens; MFU is achieved model
FLOP/s over a peak. Numbers depend only on shapes, so a test can check them by hand on a tiny config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks, FLOP/s (torchtitan's get_peak_flops table; no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    "A100": 312e12,
}

NUM_REGION_LEVELS = 4


def peak_flops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak for a CUDA device name, None where unknown (and always for CPUs).

    Longer keys first, so "H100 PCIe" is not taken for the SXM part.
    """
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


@dataclass(frozen=True)
class LLMShape:
    """A LLaMA-style decoder: ``layers`` blocks of attention (``heads`` x ``head_dim``, ``kv_heads``) + SwiGLU."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> "LLMShape":
        heads = int(text_config.num_attention_heads)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            layers=int(text_config.num_hidden_layers),
            hidden=int(text_config.hidden_size),
            heads=heads,
            head_dim=int(head_dim),
            kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
            intermediate=int(text_config.intermediate_size),
            vocab=int(text_config.vocab_size),
        )

    def linear_shapes(self) -> Dict[str, tuple]:
        """(in, out) of each linear layer of one block, by its LLaMA leaf name."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, self.intermediate),
            "up_proj": (d, self.intermediate),
            "down_proj": (self.intermediate, d),
        }

    def block_matmul_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    def matmul_params(self) -> int:
        """Matmul weights the forward multiplies by: every block's linears + the output head (no embedding)."""
        return self.layers * self.block_matmul_params() + self.hidden * self.vocab

    def lora_params(self, rank: int, targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> int:
        """LoRA A (in x r) + B (r x out) over the targeted linears of every block."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass(frozen=True)
class VisionShape:
    """A CLIP ViT: ``layers`` pre-LN blocks of width ``hidden`` (MLP ``intermediate``), ``patch`` px patches."""

    layers: int
    hidden: int
    intermediate: int
    patch: int
    image_size: int

    @classmethod
    def from_config(cls, vision_config) -> "VisionShape":
        return cls(
            layers=int(vision_config.num_hidden_layers),
            hidden=int(vision_config.hidden_size),
            intermediate=int(vision_config.intermediate_size),
            patch=int(vision_config.patch_size),
            image_size=int(vision_config.image_size),
        )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        """Sequence length inside the tower: patches + CLS."""
        return self.grid**2 + 1

    def matmul_params(self) -> int:
        """q, k, v, o (4 d^2) + fc1, fc2 (2 d I) per block, + the patch-embedding conv (3 p^2 d)."""
        d = self.hidden
        return self.layers * (4 * d * d + 2 * d * self.intermediate) + 3 * self.patch**2 * d

    def forward_flops(self) -> float:
        """One image through the tower: ``2 N_v T_v + 4 L_v d_v T_v^2``."""
        t = self.tokens
        return 2.0 * self.matmul_params() * t + 4.0 * self.layers * self.hidden * t * t


@dataclass(frozen=True)
class RegionShape:
    """The multi-level region encoder: ViT width ``vision_hidden``, width ``hidden``, RoIAlign ``roi`` x ``roi``."""

    vision_hidden: int
    hidden: int
    llm_hidden: int
    grid: int
    roi: int
    fuse_rounds: int

    @classmethod
    def from_config(cls, config) -> "RegionShape":
        return cls(
            vision_hidden=int(config.vision_config.hidden_size),
            hidden=int(config.region_hidden_size),
            llm_hidden=int(config.text_config.hidden_size),
            grid=int(config.patch_grid),
            roi=int(config.roi_output_size),
            fuse_rounds=int(config.region_fuse_rounds),
        )

    def map_pixels(self) -> int:
        """Pixels of the four levels, sides 8G, 4G, 2G, G."""
        return sum((self.grid * 2 ** (NUM_REGION_LEVELS - 1 - lvl)) ** 2 for lvl in range(NUM_REGION_LEVELS))

    def per_image_forward_flops(self) -> float:
        """1x1 input convs ((C_v + 2) -> C) and the fuse rounds' 3x3 convs (C -> C) over every map pixel."""
        c, p = self.hidden, self.map_pixels()
        return 2.0 * p * c * (self.vision_hidden + 2) + self.fuse_rounds * 2.0 * p * 9 * c * c

    def per_region_forward_flops(self) -> float:
        """Per box: four 3x3 convs on R x R, flatten linear (C R^2 -> C), box MLP, and the LLM-width output."""
        c, r = self.hidden, self.roi
        box_hidden = max(c // 4, 4)
        pconvs = NUM_REGION_LEVELS * 2.0 * r * r * 9 * c * c
        flatten = 2.0 * c * r * r * c
        box_mlp = 2.0 * (4 * box_hidden + box_hidden * c)
        to_llm = 2.0 * c * self.llm_hidden
        return pconvs + flatten + box_mlp + to_llm


@dataclass(frozen=True)
class FlopModel:
    """Everything needed to count a sample's training FLOPs.

    ``llm_trained`` / ``llm_frozen`` split the LLM's matmul weights (LoRA adapters are trained weights that
    every token multiplies by); ``region_trained`` says whether the region encoder and projector train.
    """

    llm: LLMShape
    vision: VisionShape
    region: RegionShape
    projector_params: int
    llm_frozen: int
    llm_trained: int
    region_trained: bool = True
    vision_trained: bool = False

    @classmethod
    def from_config(cls, config, lora_rank: Optional[int] = None, full_ft: bool = False, train_vision: bool = False) -> "FlopModel":
        """Shapes from a :class:`GPT4RoIConfig`; LoRA of ``lora_rank`` on all LLM linears, or full fine-tuning."""
        llm = LLMShape.from_config(config.text_config)
        vision = VisionShape.from_config(config.vision_config)
        d_v, d = vision.hidden, llm.hidden
        projector = d_v * d + (d * d if config.projector_type == "mlp2x_gelu" else 0)
        base = llm.matmul_params()
        if full_ft:
            frozen, trained = 0, base
        else:
            frozen, trained = base, (llm.lora_params(lora_rank) if lora_rank else 0)
        return cls(llm, vision, RegionShape.from_config(config), projector, frozen, trained, True, train_vision)

    def sample_flops(self, seq_len: int, num_images: int, num_regions: int) -> Dict[str, float]:
        """Training FLOPs of one sample of ``seq_len`` tokens (its image tokens included), by component."""
        llm = self.llm
        vision_factor = 3.0 if self.vision_trained else 1.0
        region_factor = 3.0 if self.region_trained else 1.0
        image_tokens = num_images * self.vision.grid**2
        return {
            "llm_dense": seq_len * (4.0 * self.llm_frozen + 6.0 * self.llm_trained),
            "llm_attention": 12.0 * llm.layers * llm.heads * llm.head_dim * seq_len * seq_len,
            "vision_tower": vision_factor * num_images * self.vision.forward_flops(),
            "projector": region_factor * 2.0 * self.projector_params * image_tokens,
            "region_encoder": region_factor
            * (num_images * self.region.per_image_forward_flops() + num_regions * self.region.per_region_forward_flops()),
        }

    def batch_flops(self, samples: Iterable[dict]) -> Dict[str, float]:
        """Component-wise sum over ``samples`` (dicts with ``seq_len``, ``num_images``, ``num_regions``)."""
        total: Dict[str, float] = {}
        for s in samples:
            for k, v in self.sample_flops(s["seq_len"], s["num_images"], s["num_regions"]).items():
                total[k] = total.get(k, 0.0) + v
        total["total"] = sum(total.values())
        return total

    def describe(self) -> dict:
        return {
            "llm_matmul_params": self.llm.matmul_params(),
            "llm_frozen_params": self.llm_frozen,
            "llm_trained_params": self.llm_trained,
            "vision_matmul_params": self.vision.matmul_params(),
            "vision_forward_flops_per_image": self.vision.forward_flops(),
            "projector_params": self.projector_params,
            "region_forward_flops_per_image": self.region.per_image_forward_flops(),
            "region_forward_flops_per_region": self.region.per_region_forward_flops(),
            "shapes": {"llm": asdict(self.llm), "vision": asdict(self.vision), "region": asdict(self.region)},
        }


def mfu(flops: float, seconds: float, peak_flops: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s over ``peak_flops``; None when there is no peak (CPU) or no time."""
    if not peak_flops or seconds <= 0:
        return None
    return flops / seconds / peak_flops


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10, warmup: int = 3) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` GEMM on ``device`` (median of ``repeats``), the in-run ceiling.

    Random operands (zeros can run faster than real data); on CUDA timed with events after warm-up.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    times.sort()
    seconds = times[len(times) // 2]
    rate = 2.0 * n**3 / seconds
    log.info("matmul %dx%d %s on %s: %.2f TFLOP/s", n, n, dtype, device, rate / 1e12)
    return rate
