"""Samplers: several sources mixed by ratio, and length-grouped order; both sharded and resumable.

Each sampler computes one global order of dataset indices per epoch (deterministic for ``seed`` and
``epoch``), pads it by wrapping around so every rank gets the same count, and gives rank ``r`` its share.
Resuming mid-epoch is ``set_epoch(epoch, start_index=k)``: the iterator skips the first ``k`` indices of
this rank's share, so a restarted run sees exactly the samples it has not seen yet.

Positions are also global: ``rank_order(epoch, start=P)`` shares out the epoch's order from its ``P``-th
sample on. Since ``k`` micro-batches on each of ``W`` ranks consume exactly the first ``k * batch * W``
samples of the global order, a run resumed on another number of processes continues at the same sample.
The order itself never depends on the number of processes (a length-grouped order is built for the world
size the run started with, ``order_world_size``).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gpt4roi_sft.errors import ConfigError


def parse_mixture(spec: str) -> List[Tuple[str, Optional[float]]]:
    """``"a.jsonl:0.7,b.jsonl:0.3"`` -> ``[("a.jsonl", 0.7), ("b.jsonl", 0.3)]`` (ratio None when omitted)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        path, sep, ratio = part.rpartition(":")
        if not sep or not ratio.replace(".", "", 1).isdigit():
            out.append((part, None))
            continue
        out.append((path, float(ratio)))
    if not out:
        raise ConfigError(f"data.train: no file in {spec!r}")
    return out


def normalise_ratios(ratios: Sequence[Optional[float]], sizes: Sequence[int]) -> np.ndarray:
    """Ratios summing to 1; when none is given, proportional to the sources' sizes."""
    if all(r is None for r in ratios):
        weights = np.asarray(sizes, dtype=np.float64)
    elif any(r is None for r in ratios):
        raise ConfigError("give a mixing ratio for every data file or for none")
    else:
        weights = np.asarray(ratios, dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"mixing ratios must be >= 0 with a positive sum, got {list(ratios)}")
    return weights / weights.sum()


class _ShardedSampler(torch.utils.data.Sampler):
    """Shared sharding, padding and resume; subclasses define :meth:`global_order`.

    The global order is padded (by wrapping) to a multiple of ``world_size * block`` and cut into steps of
    ``world_size`` blocks; rank ``r`` takes block ``r`` of each step. ``block=1`` interleaves ranks.
    """

    block = 1

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start_index = 0

    def global_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def rank_order(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's list of indices for ``epoch``, sharing out the global order from its ``start``-th sample.

        The rest of the order is padded to a whole number of steps with samples from the epoch's beginning
        (the same padding whatever ``start`` is a multiple of the step size).
        """
        order = self.global_order(epoch)
        tail = order[int(start):]
        chunk = self.world_size * self.block
        padded = -(-len(tail) // chunk) * chunk
        if padded > len(tail):
            tail = np.concatenate([tail, np.resize(order, padded - len(tail))])
        return tail.reshape(-1, self.world_size, self.block)[:, self.rank, :].reshape(-1)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch and how many of this rank's indices were already consumed in it."""
        self.epoch = int(epoch)
        self.start_index = int(start_index)

    def state_dict(self, num_consumed: Optional[int] = None) -> Dict[str, int]:
        """Position to resume from: ``num_consumed`` samples of this rank into :attr:`epoch`."""
        return {"epoch": self.epoch, "start_index": self.start_index if num_consumed is None else int(num_consumed)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.set_epoch(state["epoch"], state.get("start_index", 0))

    def __len__(self) -> int:
        return len(self.rank_order(self.epoch)) - self.start_index

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order(self.epoch)
        return iter(order[self.start_index :].tolist())


class MixtureSampler(_ShardedSampler):
    """Draw from several sources (consecutive index ranges of one dataset) by ratio.

    ``sizes`` are the sources' record counts (``ConversationDataset.source_sizes``). An epoch has
    ``num_samples`` draws (default: the total record count); source ``s`` gets ``round(ratio_s *
    num_samples)`` of them (rounding remainders go to the largest fractional parts), taken from a fresh
    permutation of the source each time it runs out, and the draws are shuffled together.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        ratios: Optional[Sequence[Optional[float]]] = None,
        num_samples: Optional[int] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(seed, rank, world_size)
        self.sizes = [int(n) for n in sizes]
        if ratios is None:
            ratios = [None] * len(self.sizes)
        if len(ratios) != len(self.sizes):
            raise ConfigError(f"{len(ratios)} mixing ratios for {len(self.sizes)} data files")
        self.ratios = normalise_ratios(ratios, self.sizes)
        for n, r in zip(self.sizes, self.ratios):
            if r > 0 and n == 0:
                raise ConfigError("a data file with a positive mixing ratio has no records")
        self.num_samples = int(num_samples) if num_samples is not None else sum(self.sizes)
        self.offsets = np.cumsum([0] + self.sizes)[:-1]

    def counts(self) -> np.ndarray:
        """Draws per source in one epoch (sums to ``num_samples``)."""
        exact = self.ratios * self.num_samples
        counts = np.floor(exact).astype(np.int64)
        rest = self.num_samples - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
        return counts

    def global_order(self, epoch: int) -> np.ndarray:
        draws = []
        for s, count in enumerate(self.counts()):
            rng = np.random.default_rng([self.seed, epoch, s])
            cycles = -(-count // self.sizes[s]) if count else 0
            perm = np.concatenate([rng.permutation(self.sizes[s]) for _ in range(cycles)] or [np.zeros(0, np.int64)])
            draws.append(perm[:count] + self.offsets[s])
        order = np.concatenate(draws).astype(np.int64)
        return np.random.default_rng([self.seed, epoch, len(self.sizes)]).permutation(order)


def length_grouped_order(lengths: Sequence[int], group_size: int, megabatch_mult: int, rng) -> np.ndarray:
    """HF-style: shuffle, cut into megabatches of ``group_size * megabatch_mult``, sort each by length (longest first)."""
    perm = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    mega = group_size * megabatch_mult
    parts = [perm[i : i + mega] for i in range(0, len(perm), mega)]
    return np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts]) if parts else perm


class LengthGroupedSampler(_ShardedSampler):
    """Put samples of similar length in the same step to waste little padding.

    The order is cut into steps of ``world_size * batch_size`` indices; rank ``r`` takes the ``r``-th
    ``batch_size`` block of each step, so all ranks' batches in a step come from the same sorted
    megabatch. Lengths alone decide (no modality split), so all-image or all-text data work alike.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        megabatch_mult: int = 50,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        order_world_size: Optional[int] = None,
    ):
        super().__init__(seed, rank, world_size)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ConfigError("LengthGroupedSampler needs at least one sample")
        self.batch_size = int(batch_size)
        self.block = self.batch_size
        self.megabatch_mult = int(megabatch_mult)
        # Megabatches hold one step of the world the run started with, so a resumed run on another number of
        # processes keeps the order (and its position in it).
        self.order_world_size = int(order_world_size or world_size)

    def global_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return length_grouped_order(self.lengths, self.order_world_size * self.batch_size, self.megabatch_mult, rng)
