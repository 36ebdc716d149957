"""``GPT4RoIProcessor``: tokenizer + :class:`ImageTransform` -> the model's keyword arguments.

Texts are used as given (templates belong to :mod:`gpt4roi_sft.conversation` or the caller). Each
``<image>`` becomes ``num_image_tokens`` image tokens; each ``<bbox>`` stays one token and takes the next
box of its sample. Boxes arrive in pixels of the given image and leave as xyxy fractions of the square
image the tower sees. Each sample becomes an item through :class:`~gpt4roi_sft.data.model_inputs.SampleEncoder`
and the batch is padded by :class:`~gpt4roi_sft.data.collator.PaddingCollator`, as training items are.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from transformers import AutoTokenizer, BatchFeature

from gpt4roi_sft.atomic import write_json_atomic
from gpt4roi_sft.constants import BBOX_TOKEN, CLIP_MEAN, CLIP_STD, IMAGE_TOKEN
from gpt4roi_sft.data.collator import PaddingCollator
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.data.model_inputs import SampleEncoder, expand_image_tokens
from gpt4roi_sft.errors import ConfigError, DataError

PROCESSOR_CONFIG_NAME = "gpt4roi_processor.json"


class GPT4RoIProcessor:
    """Turns images, texts and pixel boxes into ``input_ids``, ``attention_mask``, ``pixel_values``, ``boxes``."""

    def __init__(self, tokenizer, image_transform: ImageTransform, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = int(num_image_tokens)
        for token in (IMAGE_TOKEN, BBOX_TOKEN):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ConfigError(f"tokenizer has no {token} token; add it (load_model does) before building a processor")

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def bbox_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(BBOX_TOKEN)

    @property
    def encoder(self) -> SampleEncoder:
        """The item builder the training dataset uses too (same expansion, box checks and image transform)."""
        return SampleEncoder(self.image_transform, self.image_token_id, self.num_image_tokens, self.bbox_token_id)

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
        """Write the tokenizer files and ``gpt4roi_processor.json`` (image size, resize mode, token count)."""
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
        return cls(AutoTokenizer.from_pretrained(path), transform, cfg["num_image_tokens"])


__all__ = ["GPT4RoIProcessor", "PROCESSOR_CONFIG_NAME"]
