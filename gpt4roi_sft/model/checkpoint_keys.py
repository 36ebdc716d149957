"""Key maps from original-LLaVA and released GPT4RoI checkpoints to :class:`GPT4RoIForCausalLM`.

Original LLaVA (``LlavaLlamaForCausalLM``, haotian-liu/LLaVA) and GPT4RoI (``SPILlavaLlamaForCausalLM``,
jshilong/GPT4RoI ``gpt4roi/models/spi_llava.py``) store the LLM as ``model.embed_tokens`` /
``model.layers.*`` / ``model.norm`` / ``lm_head``, the projector as ``model.mm_projector`` (one Linear, or
``.0``/``.2`` of a GELU MLP), and optionally the CLIP tower as ``model.vision_tower[.0].vision_model.*``.
GPT4RoI adds ``model.spi_module`` = ``MLVLROIQueryModule`` (gpt4roi/models/layers.py):

=====================================================  ============================================
GPT4RoI key                                            this project
=====================================================  ============================================
model.spi_module.mlvl_fuse.input_conv.{l}.*            region_encoder.mlvl_fuse.input_conv.{l}.*
model.spi_module.mlvl_fuse.fuse_convs.{r}.conv.weight  region_encoder.mlvl_fuse.fuse_convs.{r}.conv.weight
model.spi_module.mlvl_fuse.fuse_convs.{r}.gn.*         region_encoder.mlvl_fuse.fuse_convs.{r}.gn.*
model.spi_module.roi_align.pconvs.{l}.*                region_encoder.pconvs.{l}.*
model.spi_module.roi_align.flatten_linear.*            region_encoder.flatten_linear.*
model.spi_module.roi_align.pos_embedd.{0,2,3,5}.*      region_encoder.box_embed.{0,2,3,5}.*
model.spi_module.roi_align.updims.*                    region_encoder.to_llm.*
=====================================================  ============================================

The released ``GPT4RoI-7B-delta-V0`` is a delta over LLaMA-7B: apply it first (GPT4RoI's
``scripts/apply_delta.py``), then open the merged directory with ``load_model(merged_dir,
vision_tower=clip_vit_l_14_dir)``. GPT4RoI's prompt wraps the image patches in ``<im_start>``/``<im_end>``
tokens; those tokens and their embedding rows are kept as ordinary vocabulary entries.

Pure functions of the keys (no model, no files): :mod:`.loading` applies them, and
``python -m gpt4roi_sft.model.convert_gpt4roi`` writes the converted model as this project's own directory.
"""

from __future__ import annotations

import re

_SPI_RULES = [
    (r"^model\.spi_module\.mlvl_fuse\.", "region_encoder.mlvl_fuse."),
    (r"^model\.spi_module\.roi_align\.pconvs\.", "region_encoder.pconvs."),
    (r"^model\.spi_module\.roi_align\.flatten_linear\.", "region_encoder.flatten_linear."),
    (r"^model\.spi_module\.roi_align\.pos_embedd\.", "region_encoder.box_embed."),
    (r"^model\.spi_module\.roi_align\.updims\.", "region_encoder.to_llm."),
]
_LLAVA_RULES = [
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    (r"^model\.vision_tower\.(?:0\.)?(?:vision_tower\.)?(?:vision_model\.)?", "vision_tower."),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


def _apply(rules, key: str):
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def convert_llava_original_state_dict(state_dict: dict) -> dict:
    """Original-LLaVA keys (and GPT4RoI's ``spi_module``) -> this project's keys.

    Raises ``KeyError`` naming the first key no rule maps (so nothing is silently dropped).
    """
    out = {}
    for key, value in state_dict.items():
        new = _apply(_SPI_RULES, key)
        if new is None:
            if key.startswith("model.spi_module."):
                raise KeyError(f"unknown GPT4RoI region-module weight {key!r}")
            new = _apply(_LLAVA_RULES, key)
        if new is None:
            raise KeyError(f"no mapping for weight {key!r}")
        out[new] = value
    return out


def convert_gpt4roi_state_dict(state_dict: dict) -> dict:
    """Released GPT4RoI checkpoint keys -> this project's keys (same rules as original LLaVA)."""
    return convert_llava_original_state_dict(state_dict)


def is_gpt4roi_state_dict(keys) -> bool:
    """Whether the keys hold GPT4RoI's region module (``model.spi_module.*``)."""
    return any(k.startswith("model.spi_module.") for k in keys)
