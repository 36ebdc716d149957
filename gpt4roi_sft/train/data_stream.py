"""The training data as a resumable stream of micro-batches for one rank.

The order of samples is a pure function of (seed, epoch), shared out among the ranks, so a run resumed at a
:class:`DataPosition` sees exactly the micro-batches an uninterrupted run would have seen from there on. The
position is global (samples of the epoch's order consumed by all ranks together), so it means the same on
any number of processes: a run saved on 2 processes and resumed on 1 (or the reverse) continues at the same
sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from gpt4roi_sft.config import Config

log = logging.getLogger(__name__)


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

    def __init__(self, dataset, sampler, collator, micro_batch_size: int, num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.world_size = int(getattr(sampler, "world_size", 1))
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

    def iterate_from(self, position: Optional[DataPosition] = None) -> Iterator[dict]:
        position = position or DataPosition()
        epoch, start = position.epoch, position.sample
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
            yield from loader
            epoch, start = epoch + 1, 0


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
    )


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
    from gpt4roi_sft.data.collator import PackingCollator, PaddingCollator

    if cfg.data.packing:
        return PackingCollator(max_length=cfg.data.max_length, pad_token_id=pad_token_id)
    return PaddingCollator(pad_token_id=pad_token_id, padding_side="right")


def build_stream(cfg: Config, processor, image_token_id: int, rank: int, world_size: int,
                 order_world_size: Optional[int] = None) -> MicroBatchStream:
    dataset = build_dataset(cfg, processor, image_token_id)
    if cfg.data.validate_on_start and rank == 0:
        dataset.validate_all()
    sampler = build_sampler(cfg, dataset, rank, world_size, order_world_size)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    collator = build_collator(cfg, pad_id)
    return MicroBatchStream(dataset, sampler, collator, cfg.train.micro_batch_size, cfg.data.num_workers)
