"""The training data as a resumable stream of micro-batches for one rank.

The order of samples is a pure function of (seed, epoch), shared out among the ranks, so a resumed run sees
exactly the micro-batches an uninterrupted run would have seen. Two streams share that order, and each says
where it stands with :meth:`position` (a JSON-able dict the checkpoint keeps):

- :class:`MicroBatchStream` cuts it into micro-batches of a fixed sample count. Its position is global
  (:class:`DataPosition`: samples of the epoch's order consumed by all ranks together), so it means the same on
  any number of processes: a run saved on 2 processes and resumed on 1 (or the reverse) continues at the same
  sample (``global_position = True``).
- :class:`TokenBudgetStream` fills each micro-batch up to a token budget (``data.pack_tokens``). Ranks consume
  samples at different rates, so its position is this rank's ``{"epoch", "offset"}`` of the next sample, one per
  rank (``global_position = False``): such a run resumes on the number of processes that saved it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from gpt4roi_sft.config import Config

log = logging.getLogger(__name__)


def _epoch_order(sampler, epoch: int) -> List[int]:
    """This rank's sample indices for ``epoch`` (the sampler's whole share, from its start)."""
    return sampler.rank_order(epoch).tolist()


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: ``sample`` samples of epoch ``epoch``'s global order are consumed."""

    epoch: int = 0
    sample: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "sample": self.sample}

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(int(data["epoch"]), int(data["sample"]))


class MicroBatchStream:
    """Yields collated micro-batches forever (epoch after epoch), starting at any :class:`DataPosition`.

    ``sampler`` is a :class:`gpt4roi_sft.data.sampler._ShardedSampler` for this rank (its ``rank``,
    ``world_size`` and ``rank_order(epoch, start)``). Each epoch ends where a rank's share no longer fills a
    micro-batch (the last, partial step of an epoch is dropped on every rank alike).
    """

    global_position = True

    def __init__(self, dataset, sampler, collator, micro_batch_size: int, num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.world_size = int(getattr(sampler, "world_size", 1))
        self._start, self._yielded = DataPosition(), 0
        self.micro_batches_per_epoch = self.micro_batches_left(DataPosition())
        if self.micro_batches_per_epoch < 1:
            raise ValueError(
                f"each rank gets {len(sampler)} samples per epoch, fewer than one micro-batch of {micro_batch_size}"
            )

    def micro_batches_left(self, position: DataPosition) -> int:
        """Whole micro-batches each rank still draws from ``position``'s epoch."""
        return len(self.sampler.rank_order(position.epoch, position.sample)) // self.micro_batch_size

    def advance(self, position: DataPosition, micro_batches: int) -> DataPosition:
        """The position after each rank drew ``micro_batches`` more micro-batches from ``position``."""
        step = self.micro_batch_size * self.world_size
        while micro_batches > 0:
            left = self.micro_batches_left(position)
            if micro_batches < left:
                return DataPosition(position.epoch, position.sample + micro_batches * step)
            micro_batches -= left
            position = DataPosition(position.epoch + 1, 0)
        return position

    def position(self) -> Dict[str, int]:
        """The global position after the micro-batches handed out so far (what a checkpoint keeps)."""
        return self.advance(self._start, self._yielded).to_dict()

    def iterate_from(self, position=None) -> Iterator[dict]:
        """Micro-batches from ``position`` (a :class:`DataPosition` or its :meth:`position` dict; ``None``: the start)."""
        if isinstance(position, dict):
            position = DataPosition.from_dict(position)
        self._start = position or DataPosition()
        self._yielded = 0
        epoch, start = self._start.epoch, self._start.sample
        while True:
            indices = self.sampler.rank_order(epoch, start).tolist()
            indices = indices[: len(indices) // self.micro_batch_size * self.micro_batch_size]
            loader = DataLoader(
                self.dataset,
                batch_size=self.micro_batch_size,
                sampler=indices,
                collate_fn=self.collator,
                num_workers=self.num_workers,
                drop_last=True,
                persistent_workers=False,
                # Its own generator: creating the loader must not draw from the global RNG, whose state
                # a resumed run restores (dropout masks would shift otherwise).
                generator=torch.Generator().manual_seed(epoch),
            )
            for batch in loader:
                self._yielded += 1
                yield batch
            epoch, start = epoch + 1, 0


class TokenBudgetStream:
    """Yields micro-batches of as many consecutive samples as fit ``budget`` tokens, forever, from any position.

    Samples come in this rank's order (epoch after epoch, a micro-batch may span an epoch boundary) and are
    grouped greedily (:func:`~gpt4roi_sft.data.collator.token_budget_groups`) by their real token counts, so
    the budget is exact and a group depends only on the samples from its first one on. :meth:`position` is the
    ``{"epoch", "offset"}`` of the first sample of the next micro-batch, valid as soon as a micro-batch has
    been handed out; resuming from it continues exactly. ``micro_batches_per_epoch`` is an estimate from the
    dataset's approximate lengths, the same on every rank (it only turns ``train.num_epochs`` into steps).
    """

    global_position = False

    def __init__(self, dataset, sampler, collator, budget: int, num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.collator = collator
        self.budget = int(budget)
        self.num_workers = num_workers
        self._position = {"epoch": 0, "offset": 0}
        per_rank = len(sampler)
        if per_rank < 1:
            raise ValueError("this rank gets no sample per epoch")
        mean_length = float(dataset.lengths().mean())
        self.micro_batches_per_epoch = max(1, math.ceil(per_rank * mean_length / self.budget))

    def position(self) -> Dict[str, int]:
        return dict(self._position)

    def _items(self, epoch: int, offset: int):
        """``((epoch, offset), item)`` for every sample of this rank from the given position on."""
        while True:
            indices = _epoch_order(self.sampler, epoch)[offset:]
            loader = DataLoader(
                self.dataset,
                sampler=indices,
                batch_size=None,  # single items; grouping by tokens happens here, in order
                num_workers=self.num_workers,
                persistent_workers=False,
                generator=torch.Generator().manual_seed(epoch),  # never draws from the restored global RNG
            )
            for k, item in enumerate(loader, start=offset):
                yield (epoch, k), item
            epoch, offset = epoch + 1, 0

    def iterate_from(self, position: Optional[Dict[str, int]] = None) -> Iterator[dict]:
        """Micro-batches from this rank's ``position`` (a :meth:`position` dict; ``None``: the start)."""
        from gpt4roi_sft.data.collator import token_budget_groups

        position = position or {"epoch": 0, "offset": 0}
        self._position = {"epoch": int(position["epoch"]), "offset": int(position["offset"])}
        items = self._items(self._position["epoch"], self._position["offset"])
        for group, following in token_budget_groups(items, self.budget, lambda entry: len(entry[1]["input_ids"])):
            (epoch, offset), _ = following  # the stream never ends, so a next sample always exists
            self._position = {"epoch": epoch, "offset": offset}
            yield self.collator([item for _, item in group])


def build_dataset(cfg: Config, processor, image_token_id: int):
    """One dataset over every ``data.train`` file (in order); the sampler mixes them by ratio."""
    from gpt4roi_sft.data.dataset import ConversationDataset

    return ConversationDataset(
        [path for path, _ in cfg.data_sources()],
        image_root=cfg.data.image_root,
        tokenizer=processor.tokenizer,
        image_transform=processor.image_transform,
        image_token_id=image_token_id,
        num_image_tokens=processor.num_image_tokens,
        template=cfg.data.template,
        max_length=cfg.data.max_length,
        load_masks=cfg.data.load_masks,
        skip_bad_records=cfg.data.skip_bad_records,
        image_layout=getattr(processor, "image_layout", "image_token"),
    )


CHECK_ITEMS = 64  # records per file that --check turns into full training items


def check_data(cfg: Config, items_per_file: int = CHECK_ITEMS) -> list:
    """What ``train_sft.py --check`` verifies of the data; returns one line per ``data.train`` file.

    Every record is checked against the schema (and its image file under ``data.image_root``). When the model
    directory's processor can be read without its weights (:func:`gpt4roi_sft.model.loading.load_processor`),
    the template's image layout must be the processor's and the first ``items_per_file`` records of each file
    are built into training items as the trainer builds them (tokenized with ``data.template``, images read,
    boxes and image-token runs checked). A bad record raises a ``DataError`` naming it.
    """
    import json

    from gpt4roi_sft.data.dataset import ConversationDataset, index_jsonl
    from gpt4roi_sft.data.schema import check_unique_id, validate_record
    from gpt4roi_sft.errors import DataError
    from gpt4roi_sft.model.loading import load_processor

    processor = load_processor(cfg.model.path)
    lines = []
    for path, _ in cfg.data_sources():
        if processor is not None:
            dataset = ConversationDataset(
                path, image_root=cfg.data.image_root, tokenizer=processor.tokenizer,
                image_transform=processor.image_transform, image_token_id=processor.image_token_id,
                num_image_tokens=processor.num_image_tokens, template=cfg.data.template,
                max_length=cfg.data.max_length, load_masks=cfg.data.load_masks, image_layout=processor.image_layout)
            dataset.validate_all()
            built = min(items_per_file, len(dataset))
            for i in range(built):
                dataset.build_item(dataset.read_record(i), dataset.where(i))
            lines.append(f"{path}: {len(dataset)} records, schema and images OK; the first {built} built as "
                         f"training items with {cfg.data.template} OK")
            continue
        index = index_jsonl(path)
        seen = {}
        with open(path, "rb") as f:
            for offset, size, lineno in zip(index.offsets, index.sizes, index.line_numbers):
                f.seek(int(offset))
                where = f"{path} line {int(lineno)}"
                try:
                    record = json.loads(f.read(int(size)))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataError(f"{where}: invalid JSON ({exc})") from None
                validate_record(record, where, image_root=cfg.data.image_root or None, require_masks=cfg.data.load_masks)
                check_unique_id(record, where, seen)
        lines.append(f"{path}: {len(index.offsets)} records, schema and images OK (tokenization is checked at "
                     "load time for this model layout)")
    return lines


def build_sampler(cfg: Config, dataset, rank: int, world_size: int, order_world_size: Optional[int] = None):
    """Mixture sampling when several sources are given, else a shuffled (optionally length-grouped) sampler.

    ``order_world_size``: the number of processes the run started with (a length-grouped order depends on it).
    """
    from gpt4roi_sft.data.sampler import LengthGroupedSampler, MixtureSampler

    sources = cfg.data_sources()
    if len(sources) == 1 and cfg.data.group_by_length:
        return LengthGroupedSampler(
            dataset.lengths(), batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank,
            world_size=world_size, order_world_size=order_world_size,
        )
    # One source with ratio 1 is a plain per-epoch shuffle.
    return MixtureSampler(
        dataset.source_sizes, [ratio for _, ratio in sources], seed=cfg.train.seed, rank=rank, world_size=world_size
    )


def build_collator(cfg: Config, pad_token_id: int):
    """Packed rows of ``<= data.max_length`` tokens (``data.packing`` or ``data.pack_tokens``), else right padding;
    widths rounded up to ``data.pad_to_multiple`` (128 for packed rows unless set)."""
    from gpt4roi_sft.data.collator import PackingCollator, PaddingCollator

    if cfg.data.packed:
        return PackingCollator(max_length=cfg.data.max_length, pad_token_id=pad_token_id, pad_to_multiple=cfg.data.row_multiple)
    return PaddingCollator(pad_token_id=pad_token_id, padding_side="right", pad_to_multiple=cfg.data.row_multiple)


def build_stream(cfg: Config, processor, image_token_id: int, rank: int, world_size: int,
                 order_world_size: Optional[int] = None):
    """This rank's stream: token-budget micro-batches with ``data.pack_tokens``, else ``train.micro_batch_size``.

    ``order_world_size``: the number of processes the run started with (see :func:`build_sampler`).
    """
    dataset = build_dataset(cfg, processor, image_token_id)
    if cfg.data.validate_on_start and rank == 0:
        dataset.validate_all()
    sampler = build_sampler(cfg, dataset, rank, world_size, order_world_size)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    collator = build_collator(cfg, pad_id)
    if cfg.data.pack_tokens > 0:
        return TokenBudgetStream(dataset, sampler, collator, cfg.data.pack_tokens, cfg.data.num_workers)
    return MicroBatchStream(dataset, sampler, collator, cfg.train.micro_batch_size, cfg.data.num_workers)
