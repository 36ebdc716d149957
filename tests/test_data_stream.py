"""The training data stream on the real dataset: token-budget micro-batches, their shapes, exact resume, sharding."""

import itertools

import pytest
import torch

from gpt4roi_sft.config import load_config
from gpt4roi_sft.errors import UserError
from gpt4roi_sft.train.data_stream import TokenBudgetStream, build_dataset, build_sampler, build_stream

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
    batches = list(itertools.islice(stream.iterate_from(0), 6))
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
    for group in stream.iterate_from(0):
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
        for group in stream.iterate_from(0):
            if stream.position()["epoch"] == 1:
                break
            ids += [sample_id for sample_id, _ in group]
        firsts.append(ids)
    assert len(set(firsts[0]) & set(firsts[1])) <= 1  # the sampler pads an odd epoch by wrapping one sample


def test_token_budget_stream_resumes_exactly_from_a_saved_position_across_an_epoch(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    stream, _ = id_stream(cfg, processor)
    uninterrupted = stream.iterate_from(0)
    # run past the first epoch boundary, remembering the position after each micro-batch
    history = []
    while not history or history[-1][1]["epoch"] < 1:
        history.append((next(uninterrupted), stream.position()))
    k = len(history) - 1  # resume right before the micro-batch that crossed into epoch 1
    following = [next(uninterrupted) for _ in range(5)]
    expected = [history[k][0]] + following
    resumed_stream, _ = id_stream(cfg, processor)
    resumed = resumed_stream.iterate_from(k, history[k - 1][1])
    assert [next(resumed) for _ in range(6)] == expected


def test_resuming_a_token_budget_stream_without_its_position_is_refused(synthetic_pix2cap, processor):
    stream, _ = id_stream(recipe(synthetic_pix2cap), processor)
    with pytest.raises(UserError, match="same number of processes"):
        next(stream.iterate_from(3, None))


def test_every_rank_estimates_the_same_epoch_length(synthetic_pix2cap, processor):
    cfg = recipe(synthetic_pix2cap)
    assert id_stream(cfg, processor, rank=0)[0].micro_batches_per_epoch == id_stream(cfg, processor, rank=1)[0].micro_batches_per_epoch


def test_padded_stream_rounds_widths_only_when_asked(synthetic_pix2cap, processor):
    proc, image_token_id = processor
    base = [f"data.train={synthetic_pix2cap['train']}", f"data.image_root={synthetic_pix2cap['root']}", "train.micro_batch_size=3"]
    plain = next(build_stream(load_config(None, base), proc, image_token_id, 0, 1).iterate_from(0))
    rounded = next(build_stream(load_config(None, base + ["data.pad_to_multiple=64"]), proc, image_token_id, 0, 1).iterate_from(0))
    assert rounded["input_ids"].shape[1] % 64 == 0 and rounded["input_ids"].shape[1] >= plain["input_ids"].shape[1]
    assert torch.equal(rounded["input_ids"][:, : plain["input_ids"].shape[1]], plain["input_ids"])
