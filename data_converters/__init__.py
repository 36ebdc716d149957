"""Converters from source datasets to the conversation JSONL schema, and the synthetic Pix2Cap generator.

One module per source (``pix2cap``, ``vg``, ``refcocog``, ``llava_instruct``), each runnable as
``python -m data_converters.<source>``; the logic they share (region-caption templates, box filters,
dialogue chunking, statistics, the streaming atomic writer that checks each record against
:mod:`gpt4roi_sft.data.schema`) lives in :mod:`data_converters.common`. Offline stand-ins for source files:
``synthetic`` (Pix2Cap-COCO) and ``synthetic_vipbench`` (ViP-Bench).
:mod:`data_converters.annotate` makes new Pix2Cap-format data: it captions every panoptic segment of
your own images with a VLM (Set-of-Mark prompting), the way Pix2Cap-COCO was made.
"""
