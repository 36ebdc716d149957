"""Converters from source datasets to the conversation JSONL schema, and the synthetic Pix2Cap generator.

One module per source (``pix2cap``, ``vg``, ``refcocog``, ``llava_instruct``), each runnable as
``python -m data_converters.<source>``; the logic they share (region-caption templates, box clipping,
dialogue chunking, statistics, the streaming atomic writer) lives in :mod:`data_converters.common`.
"""
