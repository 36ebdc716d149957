"""Synthetic Pix2Cap-shaped training samples and the batches both arms see, drawn without a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.data.collator import varlen_fields

# Token ids of the synthetic vocabulary: LLaMA's <unk>, <s>, </s>, then pad, then the two added tokens.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
FIRST_TEXT_ID = 5


@dataclass
class SampleShape:
    """How a synthetic Pix2Cap dialogue is laid out, in tokens."""

    num_image_tokens: int
    image_size: int
    vocab_size: int
    image_token_id: int
    bbox_token_id: int
    min_len: int = 600
    max_len: int = 1500
    max_regions: int = 15
    system_tokens: int = 40  # system prompt + "The <image> provides an overview of the picture."
    question_tokens: tuple = (12, 20)  # "### Human: Can you describe region3 <bbox>?" and the like
    answer_tokens: tuple = (26, 40)  # ~25-word caption + "###" separator


def synthetic_sample(shape: SampleShape, rng: np.random.Generator, index: int) -> dict:
    """One dataset item (docs/architecture.md) shaped like a Pix2Cap dialogue: one image, k regions, k captions.

    Token ids are drawn directly (no tokenizer): ``<image>`` already expanded, one ``<bbox>`` per region
    in its question, labels only on the answer spans. Regions are dropped until the sample fits
    ``max_len``; the last answer is lengthened if it falls under ``min_len``.
    """

    def text(n: int) -> List[int]:
        return rng.integers(FIRST_TEXT_ID, shape.vocab_size - 2, size=n).tolist()

    head = shape.system_tokens // 2  # system prompt and "The", then the image, then "provides an overview ..."
    prefix = [BOS_ID] + text(head) + [shape.image_token_id] * shape.num_image_tokens + text(shape.system_tokens - head)
    turns = []
    for _ in range(int(rng.integers(1, shape.max_regions + 1))):
        q = text(int(rng.integers(*shape.question_tokens)))
        q[len(q) // 2] = shape.bbox_token_id
        turns.append((q, text(int(rng.integers(*shape.answer_tokens)))))
    while len(turns) > 1 and len(prefix) + sum(len(q) + len(a) for q, a in turns) > shape.max_len:
        turns.pop()
    short = shape.min_len - (len(prefix) + sum(len(q) + len(a) for q, a in turns))
    if short > 0:
        q, a = turns[-1]
        turns[-1] = (q, a + text(short))
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for q, a in turns:
        ids += q + a
        labels += [IGNORE_INDEX] * len(q) + a
    ids, labels = ids[: shape.max_len], labels[: shape.max_len]
    n = len(turns)
    xy = rng.uniform(0.0, 0.7, size=(n, 2))
    wh = rng.uniform(0.05, 0.3, size=(n, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], axis=1), dtype=torch.float32)
    pixels = torch.from_numpy(rng.standard_normal((3, shape.image_size, shape.image_size), dtype=np.float32))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": pixels,
        "boxes": boxes,
        "id": f"synthetic/{index}",
        "num_dropped_turns": 0,
    }


def sample_stats(items: List[dict]) -> List[dict]:
    """What the FLOP count needs of each sample."""
    return [{"seq_len": len(it["input_ids"]), "num_images": 1, "num_regions": len(it["boxes"])} for it in items]


def pad_packed_batch(batch: dict, length: int) -> dict:
    """A packed batch widened to ``length`` columns; the added tail is one more padding sequence (positions from 0).

    A fixed row length lets compiled attention kernels (flex attention) reuse one compilation across steps
    instead of recompiling for every packed length. Real tokens, labels and ``num_tokens`` are unchanged.
    """
    rows, width = batch["input_ids"].shape
    extra = length - width
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((rows, extra), PAD_ID, dtype=torch.long)], dim=1)
    out["labels"] = torch.cat([batch["labels"], torch.full((rows, extra), IGNORE_INDEX, dtype=torch.long)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra).expand(rows, extra)], dim=1)
    out.update(varlen_fields(out["position_ids"]))
    return out


def collate_steps(items: List[dict], micro_batch: int, collator) -> List[dict]:
    """Consecutive groups of ``micro_batch`` items, collated; step i always holds the same samples in both arms."""
    return [collator(items[i : i + micro_batch]) for i in range(0, len(items) - micro_batch + 1, micro_batch)]


class SamplePool:
    """Synthetic samples drawn on demand, always in the same order: every arm's step ``i`` of a given grouping
    holds the same samples, and a longer run only appends."""

    def __init__(self, shape: SampleShape, seed: int):
        self.shape = shape
        self.rng = np.random.default_rng(seed)
        self.items: List[dict] = []

    def __getitem__(self, i: int) -> dict:
        while len(self.items) <= i:
            self.items.append(synthetic_sample(self.shape, self.rng, len(self.items)))
        return self.items[i]

    def groups(self, n_groups: int, micro_batch: int, budget: Optional[int] = None) -> List[List[dict]]:
        """The first ``n_groups`` micro-batches: ``micro_batch`` samples each, or (``budget``) consecutive samples up
        to ``budget`` tokens, grouped by the trainer's own rule (``token_budget_groups``)."""
        if budget is None:
            return [[self[g * micro_batch + j] for j in range(micro_batch)] for g in range(n_groups)]
        from gpt4roi_sft.data.collator import token_budget_groups

        out = []
        for group, _ in token_budget_groups(self._endless(), budget, lambda it: len(it["input_ids"])):
            out.append(group)
            if len(out) == n_groups:
                return out
        return out

    def _endless(self):
        i = 0
        while True:
            yield self[i]
            i += 1


def collate_groups(groups: List[List[dict]], collator: Callable[[List[dict]], dict]) -> List[dict]:
    return [collator(group) for group in groups]
