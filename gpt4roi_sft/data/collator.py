"""Batch dataset items: pad to a rectangle, or pack several samples into each row.

Both produce the model inputs of docs/architecture.md: ``pixel_values (I, 3, S, S)`` hold one image per
``<image>`` run in the order the runs appear in the flattened (row-major) ``input_ids``, and ``boxes`` is
the list of the I images' ``(N_i, 4)`` boxes in the same order.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple, TypeVar

import torch

from gpt4roi_sft.constants import IGNORE_INDEX


def _vision_inputs(items: Sequence[dict]) -> dict:
    """pixel_values / boxes / region_masks of the items that have an image, in the given item order."""
    with_image = [it for it in items if it.get("pixel_values") is not None]
    out = {
        "pixel_values": torch.stack([it["pixel_values"] for it in with_image]) if with_image else None,
        "boxes": [it["boxes"] for it in with_image],
    }
    if with_image and all("region_masks" in it for it in with_image):
        out["region_masks"] = [it["region_masks"] for it in with_image]
    return out


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (row widths: fewer distinct shapes, fewer kernel plans)."""
    return -(-n // multiple) * multiple


class PaddingCollator:
    """Pad items to the longest one: right padding for training, left for batched generation.

    Returns ``input_ids``/``attention_mask``/``labels`` ``(B, L)`` (padding labelled ``IGNORE_INDEX``),
    the vision inputs, ``num_tokens`` (non-pad tokens) and ``num_label_tokens`` (trained tokens). ``L`` is the
    longest item rounded up to a multiple of ``pad_to_multiple``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple: int = 1):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple = int(pad_to_multiple)

    def __call__(self, items: Sequence[dict]) -> Dict[str, object]:
        length = round_up(max(len(it["input_ids"]) for it in items), self.pad_to_multiple)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            ids[b, cols] = it["input_ids"]
            labels[b, cols] = it["labels"]
            mask[b, cols] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, **_vision_inputs(items)}
        batch["num_tokens"] = int(mask.sum())
        batch["num_label_tokens"] = int((labels != IGNORE_INDEX).sum())
        return batch


def pack_sequences(lengths: Sequence[int], max_length: int) -> List[List[int]]:
    """Greedy first-fit: assign sample indices (in order) to the first row with room; rows sum to <= max_length."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing length {max_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


class PackingCollator:
    """Pack the batch's samples into as few rows of ``<= max_length`` tokens as first-fit finds.

    ``position_ids`` restart at 0 for every sample (and for the padding run at a row's end, which is a
    sample of its own that nothing attends to); there is no ``attention_mask`` (None), so the model must
    keep attention within samples: ``sdpa`` through the block-diagonal mask transformers builds from
    ``position_ids``, varlen kernels (``torch_varlen``, flash attention) through :func:`varlen_fields`,
    the samples' boundaries in the flattened batch, computed here on the host. Each sample's first label is
    ``IGNORE_INDEX`` so no loss predicts one sample from the previous one. Rows are as wide as the fullest
    one, rounded up to a multiple of ``pad_to_multiple`` (so few distinct shapes reach the kernels).
    """

    def __init__(self, max_length: int, pad_token_id: int, pad_to_multiple: int = 1):
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple = int(pad_to_multiple)

    def __call__(self, items: Sequence[dict]) -> Dict[str, object]:
        rows = pack_sequences([len(it["input_ids"]) for it in items], self.max_length)
        length = round_up(max(sum(len(items[i]["input_ids"]) for i in row) for row in rows), self.pad_to_multiple)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        order = []
        num_tokens = 0
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                it = items[i]
                n = len(it["input_ids"])
                ids[r, col : col + n] = it["input_ids"]
                labels[r, col : col + n] = it["labels"]
                labels[r, col] = IGNORE_INDEX
                positions[r, col : col + n] = torch.arange(n)
                col += n
                order.append(i)
            num_tokens += col
            positions[r, col:] = torch.arange(length - col)
        batch = {
            "input_ids": ids,
            "attention_mask": None,
            "position_ids": positions,
            "labels": labels,
            **_vision_inputs([items[i] for i in order]),
            **varlen_fields(positions),
            "num_tokens": num_tokens,
            "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
        }
        return batch


T = TypeVar("T")


def token_budget_groups(items: Iterable[T], budget: int, length: Callable[[T], int]) -> Iterator[Tuple[List[T], T]]:
    """Consecutive groups of ``items``, each as long as its total ``length`` stays within ``budget`` tokens.

    Greedy and order-preserving: an item that would overflow the current group starts the next one, so a
    group is a pure function of the items from its first one on (what exact resume needs). Yields
    ``(group, next_item)`` where ``next_item`` is the item that starts the following group (None after the
    last group of a finite iterable). An item longer than ``budget`` is a group of its own.
    """
    group: List[T] = []
    used = 0
    for item in items:
        n = length(item)
        if group and used + n > budget:
            yield group, item
            group, used = [], 0
        group.append(item)
        used += n
    if group:
        yield group, None


def packed_sequence_lengths(position_ids: torch.Tensor) -> List[int]:
    """Lengths of the sequences in packed ``position_ids (B, L)`` (row-major; a new one starts at each 0)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten().tolist() + [flat.numel()]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens (num_seqs + 1,)`` int32 of packed ``position_ids``, for varlen flash attention."""
    lengths = torch.tensor([0] + packed_sequence_lengths(position_ids), dtype=torch.int32)
    return torch.cumsum(lengths, dim=0, dtype=torch.int32)


def varlen_fields(position_ids: torch.Tensor) -> Dict[str, object]:
    """The keyword arguments transformers' varlen attention reads (``cu_seq_lens_q/_k`` int32, ``max_length_q/_k``
    int) for packed ``position_ids``; the lengths are Python ints, so the kernel call reads nothing back."""
    cu = cu_seqlens_from_position_ids(position_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
