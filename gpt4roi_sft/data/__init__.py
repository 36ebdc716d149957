"""Data pipeline: conversation JSONL -> items -> batches (see docs/architecture.md).

Names are imported on first use, so ``gpt4roi_sft.data.schema`` (which converters and eval loaders use)
loads without torch.
"""

import importlib

_SOURCES = {
    "PackingCollator": "collator",
    "PaddingCollator": "collator",
    "cu_seqlens_from_position_ids": "collator",
    "pack_sequences": "collator",
    "packed_sequence_lengths": "collator",
    "varlen_fields": "collator",
    "ConversationDataset": "dataset",
    "index_jsonl": "dataset",
    "panoptic_segment_mask": "dataset",
    "ImageTransform": "image_transform",
    "MODEL_INPUT_KEYS": "model_inputs",
    "SampleEncoder": "model_inputs",
    "expand_image_tokens": "model_inputs",
    "move_to_device": "model_inputs",
    "LengthGroupedSampler": "sampler",
    "MixtureSampler": "sampler",
    "normalise_ratios": "sampler",
    "parse_mixture": "sampler",
    "coco_box_to_xyxy": "schema",
    "validate_boxes": "schema",
    "validate_record": "schema",
    "xywh_to_xyxy": "schema",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value
