"""One sample -> one model-input item, and a collated batch -> the model's device: shared by training and inference.

The dataset (a conversation record, tokenized with its label mask) and the processor (a prompt text) both turn
token ids, an image and its pixel boxes into an item through :class:`SampleEncoder`, and both batch items with
:class:`~gpt4roi_sft.data.collator.PaddingCollator`; training and generation move batches with
:func:`move_to_device`. The shapes are the model inputs of docs/architecture.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from gpt4roi_sft.constants import BBOX_TOKEN, IGNORE_INDEX, IM_END_TOKEN, IM_PATCH_TOKEN, IM_START_TOKEN, IMAGE_TOKEN
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.errors import BoxError, DataError

# The keyword arguments of GPT4RoIForCausalLM.forward / generate that a batch may carry (the cu_seq_lens /
# max_length ones: packed samples' boundaries for varlen attention, see collator.varlen_fields).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "boxes", "region_masks", "labels",
                    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# How an image sits in the token ids:
#   image_token   the tokenizer holds <image>; each becomes num_image_tokens copies of image_token_id here;
#   im_start_end  GPT4RoI / LLaVA v0 (mm_use_im_start_end): the template writes <image> as <im_start>, one
#                 <im_patch> per patch and <im_end> (tokens of the tokenizer; there is no <image> token) and
#                 the ids arrive expanded; image_token_id is <im_patch>.
IMAGE_LAYOUTS = ("image_token", "im_start_end")
# The added tokens a tokenizer must hold, one token each, for each layout.
LAYOUT_TOKENS = {"image_token": (IMAGE_TOKEN, BBOX_TOKEN),
                 "im_start_end": (IM_START_TOKEN, IM_PATCH_TOKEN, IM_END_TOKEN, BBOX_TOKEN)}


def expand_image_tokens(input_ids: Sequence[int], labels: Optional[Sequence[int]], image_token_id: int,
                        num_image_tokens: int, source_token_id: Optional[int] = None):
    """Expand every ``source_token_id`` (default: ``image_token_id``) into ``num_image_tokens`` copies of
    ``image_token_id``, never trained (``IGNORE_INDEX``). Returns ``(ids, labels)`` lists; labels None if not given.
    """
    source = image_token_id if source_token_id is None else source_token_id
    if labels is not None and len(labels) != len(input_ids):
        raise ValueError(f"{len(labels)} labels for {len(input_ids)} input ids")
    ids_out, labels_out = [], ([] if labels is not None else None)
    for k, tok in enumerate(input_ids):
        if tok == source:
            ids_out.extend([int(image_token_id)] * num_image_tokens)
            if labels_out is not None:
                labels_out.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            ids_out.append(int(tok))
            if labels_out is not None:
                labels_out.append(int(labels[k]))
    return ids_out, labels_out


class SampleEncoder:
    """Token ids (+ labels), an image and its pixel boxes (+ masks) -> one item of model inputs.

    ``source_image_token_id`` is the tokenizer's ``<image>`` (default: ``image_token_id``, the token the model
    expects ``num_image_tokens`` copies of); ``bbox_token_id`` is the tokenizer's ``<bbox>``. With
    ``image_layout="im_start_end"`` the ids already hold ``image_start_id``, ``num_image_tokens`` x
    ``image_token_id`` and ``image_end_id`` per image; they are checked, not expanded.
    """

    def __init__(self, image_transform: ImageTransform, image_token_id: int, num_image_tokens: int,
                 bbox_token_id: int, source_image_token_id: Optional[int] = None, image_layout: str = "image_token",
                 image_start_id: Optional[int] = None, image_end_id: Optional[int] = None):
        if image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {image_layout!r}")
        if image_layout == "im_start_end" and (image_start_id is None or image_end_id is None):
            raise ValueError("image_layout 'im_start_end' needs image_start_id and image_end_id")
        self.image_transform = image_transform
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.bbox_token_id = int(bbox_token_id)
        self.source_image_token_id = self.image_token_id if source_image_token_id is None else int(source_image_token_id)
        self.image_layout = image_layout
        self.image_start_id = image_start_id
        self.image_end_id = image_end_id

    def _count_start_end_images(self, input_ids: Sequence[int], where: str) -> int:
        """Images in GPT4RoI's layout; each ``<im_start>`` must open exactly ``num_image_tokens`` patches and ``<im_end>``."""
        ids = list(input_ids)
        starts = [k for k, t in enumerate(ids) if t == self.image_start_id]
        n = self.num_image_tokens
        for k in starts:
            got = 0
            while k + 1 + got < len(ids) and ids[k + 1 + got] == self.image_token_id:
                got += 1
            if got != n or k + 1 + n >= len(ids) or ids[k + 1 + n] != self.image_end_id:
                raise DataError(f"{where}: an image start token must be followed by {n} patch tokens and the image end "
                                f"token; found {got} patch tokens (a prompt rendered for another image size?)")
        if ids.count(self.image_token_id) != n * len(starts) or ids.count(self.image_end_id) != len(starts):
            raise DataError(f"{where}: image patch or end tokens outside an image start/end run")
        return len(starts)

    def __call__(self, input_ids: Sequence[int], labels: Optional[Sequence[int]] = None, image=None, boxes=(),
                 masks=None, where: str = "", clip: bool = False) -> Dict[str, Any]:
        """The item ``{"input_ids": (L,) long, "labels": (L,) long, "pixel_values": (3, S, S) float or None,
        "boxes": (N, 4) float xyxy fractions of the square, "region_masks": (N, S, S) float (only with masks)}``.

        ``image`` is a PIL image or None; ``boxes`` are pixel xyxy of ``image``, one per ``<bbox>`` token in order;
        ``masks`` (N, H, W) binary. ``labels`` default to nothing trained. Errors name ``where``: a box count that
        differs from the ``<bbox>`` count (both named), an ``<image>`` count that does not fit ``image``, bad boxes
        (``clip`` clips boxes crossing the border instead).
        """
        expanded = self.image_layout == "im_start_end"
        if expanded:
            n_image = self._count_start_end_images(input_ids, where)
        else:
            n_image = list(input_ids).count(self.source_image_token_id)
        n_bbox = list(input_ids).count(self.bbox_token_id)
        if len(boxes) != n_bbox:
            raise BoxError(f"{where}: {len(boxes)} boxes for {n_bbox} {BBOX_TOKEN} tokens")
        if n_image > 1:
            raise DataError(f"{where}: {n_image} {IMAGE_TOKEN} tokens; one image per sample is supported")
        if n_image == 1 and image is None:
            raise DataError(f"{where}: the text has {IMAGE_TOKEN} but no image was given")
        if image is not None and n_image == 0:
            raise DataError(f"{where}: an image was given but the text has no {IMAGE_TOKEN}")
        if n_bbox and image is None:
            raise DataError(f"{where}: {n_bbox} {BBOX_TOKEN} tokens need an image")
        if labels is None:
            labels = [IGNORE_INDEX] * len(input_ids)
        if expanded:  # already in place; image positions are never trained
            ids = [int(t) for t in input_ids]
            labels = [IGNORE_INDEX if t == self.image_token_id else int(lab) for t, lab in zip(ids, labels)]
        else:
            ids, labels = expand_image_tokens(input_ids, labels, self.image_token_id, self.num_image_tokens,
                                              source_token_id=self.source_image_token_id)
        item = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": None,
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
        }
        if image is not None:
            out = self.image_transform(image, boxes, masks, where=where, clip=clip)
            item["pixel_values"] = out.pixel_values
            item["boxes"] = out.boxes
            if out.masks is not None:
                item["region_masks"] = out.masks
        return item


def move_to_device(batch: Dict[str, Any], device, float_dtype: torch.dtype, non_blocking: bool = False) -> Dict[str, Any]:
    """The model inputs of ``batch`` (those not None) on ``device``; images and masks in the model's float dtype.

    ``non_blocking`` copies do not wait for the kernels already queued on the device (the training loop's
    choice; a blocking host-to-device copy synchronises the stream first). To CUDA they leave from page-locked
    memory, cast on the host first: from pageable memory the driver stages the copy and may wait for the stream.
    """
    pin = non_blocking and torch.device(device).type == "cuda"

    def move(value, cast: bool):
        if isinstance(value, torch.Tensor):
            dtype = float_dtype if cast and value.is_floating_point() else value.dtype
            if pin and value.device.type == "cpu":
                value = value.to(dtype).pin_memory()
            return value.to(device=device, dtype=dtype, non_blocking=non_blocking)
        if isinstance(value, (list, tuple)):
            return [move(v, cast) for v in value]
        return value

    return {k: move(batch[k], k in ("pixel_values", "region_masks")) for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
