"""Data pipeline: conversation JSONL -> items -> batches (see docs/architecture.md)."""

from gpt4roi_sft.data.collator import (
    PackingCollator,
    PaddingCollator,
    cu_seqlens_from_position_ids,
    pack_sequences,
    packed_sequence_lengths,
)
from gpt4roi_sft.data.dataset import ConversationDataset, index_jsonl, panoptic_segment_mask
from gpt4roi_sft.data.image_transform import ImageTransform, validate_boxes
from gpt4roi_sft.data.model_inputs import MODEL_INPUT_KEYS, SampleEncoder, expand_image_tokens, move_to_device
from gpt4roi_sft.data.sampler import LengthGroupedSampler, MixtureSampler, normalise_ratios, parse_mixture

__all__ = [
    "MODEL_INPUT_KEYS",
    "ConversationDataset",
    "ImageTransform",
    "LengthGroupedSampler",
    "MixtureSampler",
    "PackingCollator",
    "PaddingCollator",
    "SampleEncoder",
    "cu_seqlens_from_position_ids",
    "expand_image_tokens",
    "index_jsonl",
    "move_to_device",
    "normalise_ratios",
    "pack_sequences",
    "packed_sequence_lengths",
    "panoptic_segment_mask",
    "parse_mixture",
    "validate_boxes",
]
