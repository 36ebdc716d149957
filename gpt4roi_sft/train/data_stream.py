"""The training data as a resumable stream of micro-batches for one rank.

The order of samples is a pure function of (seed, epoch, rank), so a run resumed after ``k`` micro-batches
sees exactly the micro-batches an uninterrupted run would have seen from ``k`` on.
"""

from __future__ import annotations

import logging
from typing import Iterator, List

import torch
from torch.utils.data import DataLoader

from gpt4roi_sft.config import Config

log = logging.getLogger(__name__)


class MicroBatchStream:
    """Yields collated micro-batches forever (epoch after epoch), starting at any micro-batch position."""

    def __init__(self, dataset, sampler, collator, micro_batch_size: int, num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.micro_batches_per_epoch = len(sampler) // micro_batch_size
        if self.micro_batches_per_epoch < 1:
            raise ValueError(
                f"each rank gets {len(sampler)} samples per epoch, fewer than one micro-batch of {micro_batch_size}"
            )

    def _epoch_indices(self, epoch: int) -> List[int]:
        self.sampler.set_epoch(epoch)
        indices = list(iter(self.sampler))
        return indices[: self.micro_batches_per_epoch * self.micro_batch_size]

    def iterate_from(self, consumed_micro_batches: int) -> Iterator[dict]:
        epoch, offset = divmod(consumed_micro_batches, self.micro_batches_per_epoch)
        while True:
            indices = self._epoch_indices(epoch)[offset * self.micro_batch_size :]
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
            epoch, offset = epoch + 1, 0


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
    from gpt4roi_sft.data.schema import validate_record
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
        with open(path, "rb") as f:
            for offset, size, lineno in zip(index.offsets, index.sizes, index.line_numbers):
                f.seek(int(offset))
                where = f"{path} line {int(lineno)}"
                try:
                    record = json.loads(f.read(int(size)))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataError(f"{where}: invalid JSON ({exc})") from None
                validate_record(record, where, image_root=cfg.data.image_root or None, require_masks=cfg.data.load_masks)
        lines.append(f"{path}: {len(index.offsets)} records, schema and images OK (tokenization is checked at "
                     "load time for this model layout)")
    return lines


def build_sampler(cfg: Config, dataset, rank: int, world_size: int):
    """Mixture sampling when several sources are given, else a shuffled (optionally length-grouped) sampler."""
    from gpt4roi_sft.data.sampler import LengthGroupedSampler, MixtureSampler

    sources = cfg.data_sources()
    if len(sources) == 1 and cfg.data.group_by_length:
        return LengthGroupedSampler(
            dataset.lengths(), batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank, world_size=world_size
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


def build_stream(cfg: Config, processor, image_token_id: int, rank: int, world_size: int) -> MicroBatchStream:
    dataset = build_dataset(cfg, processor, image_token_id)
    if cfg.data.validate_on_start and rank == 0:
        dataset.validate_all()
    sampler = build_sampler(cfg, dataset, rank, world_size)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    collator = build_collator(cfg, pad_id)
    return MicroBatchStream(dataset, sampler, collator, cfg.train.micro_batch_size, cfg.data.num_workers)
