"""The training data streams: token-budget micro-batches (exact budget, rounded rows, exact resume per rank) and
fixed-size micro-batches whose position is global, so a run resumed on another number of processes continues at
the same sample, and on the same number continues exactly."""

import itertools

import numpy as np
import pytest
import torch

from gpt4roi_sft.config import load_config
from gpt4roi_sft.data.sampler import LengthGroupedSampler, MixtureSampler
from gpt4roi_sft.errors import UserError
from gpt4roi_sft.train.data_stream import (DataPosition, MicroBatchStream, TokenBudgetStream, build_dataset, build_sampler,
                                           build_stream)

BUDGET, MAX_LENGTH = 1024, 512


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from gpt4roi_sft import load_model

    model, processor = load_model(tiny_model_dir)
    return processor, model.config.image_token_id


def recipe(data, *extra):
    return load_config(None, [f"data.train={data['train']}", f"data.image_root={data['root']}",
                              f"data.max_length={MAX_LENGTH}", f"data.pack_tokens={BUDGET}", "train.micro_batch_size=2", *extra])


def id_stream(cfg, processor, rank=0, world=2):
    """A token-budget stream whose micro-batches are the lists of their samples' ids (so order can be traced)."""
    proc, image_token_id = processor
    dataset = build_dataset(cfg, proc, image_token_id)
    collate = lambda items: [(it["id"], len(it["input_ids"])) for it in items]  # noqa: E731
    return TokenBudgetStream(dataset, build_sampler(cfg, dataset, rank, world), collate, cfg.data.pack_tokens), dataset


def test_token_budget_micro_batches_stay_within_the_budget_in_rows_of_rounded_width(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    proc, image_token_id = processor
    stream = build_stream(cfg, proc, image_token_id, rank=0, world_size=1)
    batches = list(itertools.islice(stream.iterate_from(None), 6))
    assert all(b["num_tokens"] <= BUDGET for b in batches)
    assert all(b["input_ids"].shape[1] % 128 == 0 and b["input_ids"].shape[1] <= 512 for b in batches)
    assert all(b["attention_mask"] is None and b["position_ids"] is not None for b in batches)
    sizes = [len(b["boxes"]) for b in batches]
    assert max(sizes) > 2, "a budget of 1024 tokens should hold more than the 2-sample micro-batch size"


def test_token_budget_stream_consumes_the_rank_order_without_gaps_or_repeats(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    stream, dataset = id_stream(cfg, processor, rank=1)
    stream.sampler.set_epoch(0)
    expected = [dataset[i]["id"] for i in list(iter(stream.sampler))]
    seen = []
    for group in stream.iterate_from(None):
        seen += [sample_id for sample_id, _ in group]
        if stream.position()["epoch"] == 1:
            break
    assert seen[: len(expected)] == expected  # the last group may run into epoch 1


def test_ranks_share_no_sample_of_an_epoch_beyond_the_sampler_padding(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    firsts = []
    for rank in (0, 1):
        stream, _ = id_stream(cfg, processor, rank=rank)
        ids = []
        for group in stream.iterate_from(None):
            if stream.position()["epoch"] == 1:
                break
            ids += [sample_id for sample_id, _ in group]
        firsts.append(ids)
    assert len(set(firsts[0]) & set(firsts[1])) <= 1  # the sampler pads an odd epoch by wrapping one sample


def test_token_budget_stream_resumes_exactly_from_a_saved_position_across_an_epoch(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    stream, _ = id_stream(cfg, processor)
    uninterrupted = stream.iterate_from(None)
    # run past the first epoch boundary, remembering the position after each micro-batch
    history = []
    while not history or history[-1][1]["epoch"] < 1:
        history.append((next(uninterrupted), stream.position()))
    k = len(history) - 1  # resume right before the micro-batch that crossed into epoch 1
    following = [next(uninterrupted) for _ in range(5)]
    expected = [history[k][0]] + following
    resumed_stream, _ = id_stream(cfg, processor)
    resumed = resumed_stream.iterate_from(history[k - 1][1])
    assert [next(resumed) for _ in range(6)] == expected


def test_resuming_a_token_budget_stream_without_its_position_is_refused(synthetic_pix2cap, processor, tmp_path):
    from gpt4roi_sft.train.loop import resume_position

    stream, _ = id_stream(recipe(synthetic_pix2cap), processor)
    with pytest.raises(UserError, match="number of processes that saved it"):
        resume_position(stream, {"step": 3}, tmp_path, rank=1, consumed=3)


def test_every_rank_estimates_the_same_epoch_length(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    assert id_stream(cfg, processor, rank=0)[0].micro_batches_per_epoch == id_stream(cfg, processor, rank=1)[0].micro_batches_per_epoch


def test_padded_stream_rounds_widths_only_when_asked(synthetic_pix2cap, processor):
    proc, image_token_id = processor
    base = [f"data.train={synthetic_pix2cap['train']}", f"data.image_root={synthetic_pix2cap['root']}", "train.micro_batch_size=3"]
    plain = next(build_stream(load_config(None, base), proc, image_token_id, 0, 1).iterate_from(None))
    rounded = next(build_stream(load_config(None, base + ["data.pad_to_multiple=64"]), proc, image_token_id, 0, 1).iterate_from(None))
    assert rounded["input_ids"].shape[1] % 64 == 0 and rounded["input_ids"].shape[1] >= plain["input_ids"].shape[1]
    assert torch.equal(rounded["input_ids"][:, : plain["input_ids"].shape[1]], plain["input_ids"])


# ---------------------------------------------------------------- fixed-size micro-batches, global position


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


def test_the_stream_reports_the_position_of_what_it_handed_out():
    s = stream(1, 2, micro_batch=2, size=21)
    batches = s.iterate_from(DataPosition(0, 4))
    for _ in range(6):  # crosses the end of epoch 0 (5 micro-batches per rank, 1 of them before the start)
        next(batches)
    assert DataPosition.from_dict(s.position()) == s.advance(DataPosition(0, 4), 6)
