"""``GPT4RoIProcessor``: tokenizer + :class:`ImageTransform` -> the model's keyword arguments.

Texts are used as given (templates belong to :mod:`gpt4roi_sft.conversation` or the caller). With the
``image_token`` layout each ``<image>`` becomes ``num_image_tokens`` image tokens; with GPT4RoI's
``im_start_end`` layout (its released checkpoints) the template has already written ``<im_start>``, the
``<im_patch>`` run and ``<im_end>`` and the tokenizer has no ``<image>``. Each ``<bbox>`` stays one token and
takes the next box of its sample. Boxes arrive in pixels of the given image and leave as xyxy fractions of the square
image the tower sees. Each sample becomes an item through :class:`~gpt4roi_sft.data.model_inputs.SampleEncoder`
and the batch is padded by :class:`~gpt4roi_sft.data.collator.PaddingCollator`, as training items are.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from transformers import AutoTokenizer, BatchFeature

from gpt4roi_sft.atomic import write_json_atomic
from gpt4roi_sft.constants import (BBOX_TOKEN, CLIP_MEAN, CLIP_STD, IM_END_TOKEN, IM_PATCH_TOKEN, IM_START_TOKEN,
                                   IMAGE_TOKEN)
from gpt4roi_sft.data.collator import PaddingCollator
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.data.model_inputs import IMAGE_LAYOUTS, LAYOUT_TOKENS, SampleEncoder, expand_image_tokens
from gpt4roi_sft.errors import ConfigError, DataError

PROCESSOR_CONFIG_NAME = "gpt4roi_processor.json"


class GPT4RoIProcessor:
    """Turns images, texts and pixel boxes into ``input_ids``, ``attention_mask``, ``pixel_values``, ``boxes``."""

    def __init__(self, tokenizer, image_transform: ImageTransform, num_image_tokens: int,
                 image_layout: str = "image_token"):
        if image_layout not in IMAGE_LAYOUTS:
            raise ConfigError(f"image_layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {image_layout!r}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = int(num_image_tokens)
        self.image_layout = image_layout
        for token in self.required_tokens:
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ConfigError(f"tokenizer has no {token} token; add it (load_model does) before building a processor")

    @property
    def required_tokens(self) -> tuple:
        """The added tokens the tokenizer must hold for this layout."""
        return LAYOUT_TOKENS[self.image_layout]

    @property
    def image_token_id(self) -> int:
        """The id the model replaces by image features (``<im_patch>`` in GPT4RoI's layout)."""
        token = IM_PATCH_TOKEN if self.image_layout == "im_start_end" else IMAGE_TOKEN
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def bbox_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(BBOX_TOKEN)

    @property
    def encoder(self) -> SampleEncoder:
        """The item builder the training dataset uses too (same expansion, box checks and image transform)."""
        if self.image_layout == "im_start_end":
            ids = self.tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
            return SampleEncoder(self.image_transform, self.image_token_id, self.num_image_tokens, self.bbox_token_id,
                                 image_layout="im_start_end", image_start_id=ids[0], image_end_id=ids[1])
        return SampleEncoder(self.image_transform, self.image_token_id, self.num_image_tokens, self.bbox_token_id)

    def check_layout(self, text: str, where: str) -> None:
        """A prompt must be written in this processor's image layout (the template decides it)."""
        if self.image_layout == "im_start_end" and IMAGE_TOKEN in text:
            raise DataError(f"{where}: this model reads GPT4RoI's image layout (no {IMAGE_TOKEN} token); render the "
                            "prompt with a template that writes it, e.g. --template gpt4roi_original")
        if self.image_layout == "image_token" and IM_PATCH_TOKEN in text:
            raise DataError(f"{where}: the prompt is in GPT4RoI's image layout ({IM_PATCH_TOKEN}) but this model "
                            f"expands {IMAGE_TOKEN}; use a template such as gpt4roi_v0")

    def expand_image_tokens(self, input_ids: Sequence[int], labels: Optional[Sequence[int]] = None):
        """Replace each image token by ``num_image_tokens`` copies; their labels are ``IGNORE_INDEX``.

        Returns ``(ids, labels)`` as lists (``labels`` is None when none were given).
        """
        return expand_image_tokens(input_ids, labels, self.image_token_id, self.num_image_tokens)

    def __call__(
        self,
        images=None,
        texts: Sequence[str] | str = (),
        boxes=None,
        region_masks=None,
        padding_side: str = "left",
        clip_boxes: bool = False,
        add_special_tokens: bool = True,
    ) -> BatchFeature:
        """Batch of samples; ``images[i]``, ``boxes[i]`` (pixel xyxy of ``images[i]``) and
        ``region_masks[i]`` ((N_i, H, W) binary) belong to ``texts[i]``.

        Errors name the sample index: a box count that differs from its ``<bbox>`` count (both named),
        an ``<image>`` without an image, and bad boxes (x2 <= x1, NaN, outside; ``clip_boxes`` clips
        boxes crossing the border instead).
        """
        if isinstance(texts, str):
            texts = [texts]
        n = len(texts)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and len(images) != n:
            raise DataError(f"{len(images)} images for {n} texts")
        if boxes is not None and len(boxes) != n:
            raise DataError(f"{len(boxes)} box lists for {n} texts")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

        encoder = self.encoder
        items = []
        for i, text in enumerate(texts):
            self.check_layout(text, f"sample {i}")
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            sample_boxes = boxes[i] if boxes is not None and boxes[i] is not None else []
            image = images[i] if images is not None else None
            masks = region_masks[i] if region_masks is not None else None
            items.append(encoder(ids, None, image, sample_boxes, masks, where=f"sample {i}", clip=clip_boxes))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = PaddingCollator(pad_id, padding_side=padding_side)(items)
        data = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "boxes")}
        if region_masks is not None:
            data["region_masks"] = [it["region_masks"] for it in items if "region_masks" in it]
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, out_dir: str) -> None:
        """Write the tokenizer files and ``gpt4roi_processor.json`` (image size, resize mode, token count, layout)."""
        os.makedirs(out_dir, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        write_json_atomic(
            os.path.join(out_dir, PROCESSOR_CONFIG_NAME),
            {
                "processor_class": "GPT4RoIProcessor",
                "image_size": self.image_transform.size,
                "resize_mode": self.image_transform.resize_mode,
                "image_mean": list(self.image_transform.mean),
                "image_std": list(self.image_transform.std),
                "num_image_tokens": self.num_image_tokens,
                "image_layout": self.image_layout,
            },
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "GPT4RoIProcessor":
        """Open a directory written by :meth:`save_pretrained`."""
        cfg_path = os.path.join(path, PROCESSOR_CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{path}: no {PROCESSOR_CONFIG_NAME}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        transform = ImageTransform(
            size=cfg["image_size"],
            resize_mode=cfg.get("resize_mode", "squash"),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
        )
        return cls(AutoTokenizer.from_pretrained(path), transform, cfg["num_image_tokens"],
                   cfg.get("image_layout", "image_token"))


__all__ = ["GPT4RoIProcessor", "PROCESSOR_CONFIG_NAME"]
