"""The training data stream's position is global: a run resumed on another number of processes continues at
the same sample, and on the same number it continues exactly."""

import itertools

import numpy as np
import pytest

from gpt4roi_sft.data.sampler import LengthGroupedSampler, MixtureSampler
from gpt4roi_sft.train.data_stream import DataPosition, MicroBatchStream


def stream(rank, world, micro_batch=2, size=21, grouped=False, order_world=None):
    if grouped:
        sampler = LengthGroupedSampler(np.arange(size) % 7, batch_size=micro_batch, megabatch_mult=2, seed=4,
                                       rank=rank, world_size=world, order_world_size=order_world)
    else:
        sampler = MixtureSampler([size], seed=4, rank=rank, world_size=world)
    return MicroBatchStream(list(range(size)), sampler, lambda batch: list(batch), micro_batch)


def consumed_in_steps(world, steps, start=DataPosition(), **kw):
    """The samples each step of ``world`` ranks draws from ``start``, as one set per step."""
    ranks = [stream(r, world, **kw).iterate_from(start) for r in range(world)]
    return [sorted(sum((next(it) for it in ranks), [])) for _ in range(steps)]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (3, 2)])
def test_a_resume_on_another_number_of_processes_draws_what_the_uninterrupted_run_draws_next(before, after, grouped):
    # One step = 2 samples per rank x ranks; gradient accumulation on the smaller world keeps the samples per step.
    kw = dict(micro_batch=2, size=24, grouped=grouped, order_world=before)
    done_steps = 2
    position = stream(0, before, **kw).advance(DataPosition(), done_steps)
    uninterrupted = sum(consumed_in_steps(before, done_steps + 2, **kw), [])
    ranks = [stream(r, after, **kw).iterate_from(position) for r in range(after)]
    resumed = []
    while len(resumed) < len(uninterrupted) - 2 * before * done_steps:
        resumed += sum((next(it) for it in ranks), [])
    assert sorted(resumed) == sorted(uninterrupted[2 * before * done_steps:])


def test_on_the_same_number_of_processes_a_resume_continues_exactly():
    full = list(itertools.islice(stream(1, 2).iterate_from(), 12))
    position = stream(1, 2).advance(DataPosition(), 7)
    assert list(itertools.islice(stream(1, 2).iterate_from(position), 5)) == full[7:]


def test_the_position_rolls_over_to_the_next_epoch_where_an_epoch_ends():
    s = stream(0, 2, micro_batch=2, size=21)  # 11 samples per rank after padding: 5 micro-batches, the rest dropped
    assert s.micro_batches_per_epoch == 5
    assert s.advance(DataPosition(), 4) == DataPosition(0, 16)
    assert s.advance(DataPosition(), 5) == DataPosition(1, 0)
    assert s.advance(DataPosition(0, 16), 3) == DataPosition(1, 8)


def test_the_position_counts_samples_of_all_ranks():
    assert stream(0, 3, micro_batch=2, size=30).advance(DataPosition(), 2) == DataPosition(0, 12)
