"""``GPT4RoIConfig``: CLIP vision tower + projector + multi-level region encoder + any causal LM.

The defaults describe GPT4RoI-7B: CLIP ViT-L/14 at 224 px, image tokens from the second-to-last layer
(no CLS) through a linear projector, region features from the outputs of ViT blocks 14, 17, 20 and 23
(``hidden_states`` indices; index 0 is the patch embedding), RoIAlign 14x14, five rounds of cross-level
mixing. Tiny test models shrink every size but must keep a *shallow* region level: features of deep
layers of a random ViT do not tell regions apart (see "The tiny model" in docs/architecture.md).
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from gpt4roi_sft.constants import IGNORE_INDEX

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
REGION_MODES = ("box", "mask", "box+mask")


@strict
class GPT4RoIConfig(PreTrainedConfig):
    """Configuration of :class:`~gpt4roi_sft.model.modeling.GPT4RoIForCausalLM`.

    Region-encoder fields:
      region_feature_layers: four ``hidden_states`` indices, shallowest first; the shallowest level is
        resized to the largest map (8x the patch grid), the deepest keeps the patch grid.
      region_hidden_size: channel width inside the region encoder (GPT4RoI: the ViT width, 1024);
        ``None`` means the ViT width.
      region_gn_groups: GroupNorm groups of the mixing convs (GPT4RoI: 64); must divide region_hidden_size.
      region_mode: ``box`` (RoIAlign over the box, GPT4RoI), ``mask`` (average of the fused features under
        the region's binary mask instead), ``box+mask`` (the sum of both).
    """

    model_type = "gpt4roi"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 224,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["linear", "mlp2x_gelu"] = "linear"
    vision_feature_layer: int = -2
    region_feature_layers: list[int] | tuple[int, ...] = (14, 17, 20, 23)
    region_hidden_size: int | None = None
    roi_output_size: int = 14
    region_fuse_rounds: int = 5
    region_gn_groups: int = 64
    region_mode: Literal["box", "mask", "box+mask"] = "box"
    image_token_id: int | None = None
    bbox_token_id: int | None = None
    resize_mode: Literal["squash", "pad", "clip_squash"] = "squash"
    ignore_index: int = IGNORE_INDEX
    freeze_vision_tower: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.region_feature_layers = [int(i) for i in self.region_feature_layers]
        if len(self.region_feature_layers) != 4:
            raise ValueError(f"region_feature_layers needs 4 ViT layers, got {self.region_feature_layers}")
        if self.region_hidden_size is None:
            self.region_hidden_size = int(self.vision_config.hidden_size)
        if self.region_hidden_size % self.region_gn_groups:
            raise ValueError(
                f"region_gn_groups={self.region_gn_groups} must divide region_hidden_size={self.region_hidden_size}"
            )

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower sees, in pixels."""
        return int(self.vision_config.image_size)

    @property
    def patch_grid(self) -> int:
        """Patches per side of the image (16 for ViT-L/14 at 224 px)."""
        return self.image_size // int(self.vision_config.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image: one per patch, no CLS."""
        return self.patch_grid**2


__all__ = ["GPT4RoIConfig", "PROJECTOR_TYPES", "REGION_MODES"]
