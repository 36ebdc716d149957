"""Padding and packing collators, and the mixture / length-grouped samplers (sharding and exact resume)."""

from collections import Counter

import numpy as np
import pytest
import torch

from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.data.collator import (
    PackingCollator,
    PaddingCollator,
    cu_seqlens_from_position_ids,
    pack_sequences,
    packed_sequence_lengths,
    token_budget_groups,
)
from gpt4roi_sft.data.sampler import LengthGroupedSampler, MixtureSampler, parse_mixture
from gpt4roi_sft.errors import ConfigError

PAD = 3
IMG = 7


def item(n, tag, image=True, num_boxes=1, masks=False):
    """A fake dataset item of ``n`` tokens whose ids encode ``tag`` (so order can be traced); token 1 is an image run."""
    ids = torch.full((n,), 100 + tag, dtype=torch.long)
    ids[0] = 1
    if image:
        ids[1] = IMG
    labels = ids.clone()
    labels[: n // 2] = IGNORE_INDEX
    out = {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.full((3, 4, 4), float(tag)) if image else None,
        "boxes": torch.full((num_boxes if image else 0, 4), tag / 100.0),
        "id": str(tag),
        "num_dropped_turns": 0,
    }
    if masks:
        out["region_masks"] = torch.zeros((num_boxes, 4, 4))
    return out


# ------------------------------------------------------------------------------------------- padding
def test_move_to_device_keeps_model_inputs_and_casts_only_images_and_masks():
    from gpt4roi_sft.data.model_inputs import move_to_device

    batch = PaddingCollator(PAD)([item(5, 1, masks=True), item(3, 2, image=False)])
    moved = move_to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert set(moved) == {"input_ids", "attention_mask", "labels", "pixel_values", "boxes", "region_masks"}
    assert moved["pixel_values"].dtype == torch.bfloat16 and moved["region_masks"][0].dtype == torch.bfloat16
    assert moved["boxes"][0].dtype == torch.float32 and moved["input_ids"].dtype == torch.long


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_non_blocking_move_from_page_locked_memory_gives_the_blocking_values():
    from gpt4roi_sft.data.model_inputs import move_to_device

    batch = PaddingCollator(PAD)([item(5, 1, masks=True), item(3, 2, image=False)])
    batch["pixel_values"] = torch.randn_like(batch["pixel_values"])
    fast = move_to_device(batch, "cuda", torch.bfloat16, non_blocking=True)
    plain = move_to_device(batch, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    assert set(fast) == set(plain)
    for key in fast:
        for a, b in zip(*((v if isinstance(v, list) else [v]) for v in (fast[key], plain[key]))):
            assert a.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a, b), key
    assert not batch["pixel_values"].is_pinned()  # the caller's batch is left as it was


def test_padding_right_pads_ids_mask_and_ignores_labels():
    batch = PaddingCollator(PAD)([item(5, 1), item(3, 2)])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][1, 3:].tolist() == [PAD, PAD]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 2


def test_padding_left_puts_tokens_at_the_end():
    batch = PaddingCollator(PAD, padding_side="left")([item(5, 1), item(3, 2)])
    assert batch["input_ids"][1, :2].tolist() == [PAD, PAD] and batch["attention_mask"][1].tolist() == [0, 0, 1, 1, 1]


def test_padding_counts_tokens_and_label_tokens():
    batch = PaddingCollator(PAD)([item(5, 1), item(3, 2)])
    assert batch["num_tokens"] == 8
    assert batch["num_label_tokens"] == (5 - 2) + (3 - 1)


def test_padding_stacks_only_the_images_present():
    batch = PaddingCollator(PAD)([item(4, 1), item(4, 2, image=False), item(4, 3)])
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert [float(p[0, 0, 0]) for p in batch["pixel_values"]] == [1.0, 3.0]
    assert [b.shape for b in batch["boxes"]] == [(1, 4), (1, 4)] and "region_masks" not in batch


def test_padding_without_any_image_gives_none():
    batch = PaddingCollator(PAD)([item(4, 1, image=False)])
    assert batch["pixel_values"] is None and batch["boxes"] == []


def test_region_masks_travel_with_their_images():
    batch = PaddingCollator(PAD)([item(4, 1, masks=True, num_boxes=2), item(4, 2, masks=True)])
    assert [m.shape[0] for m in batch["region_masks"]] == [2, 1]


# ------------------------------------------------------------------------------------------- packing
def test_padding_rounds_the_width_up_to_the_multiple():
    batch = PaddingCollator(PAD, pad_to_multiple=8)([item(5, 1), item(3, 2)])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum() == batch["num_tokens"] == 8
    assert (batch["labels"][:, 5:] == IGNORE_INDEX).all()


def test_packed_rows_round_up_to_the_multiple_and_keep_the_loss_targets():
    items = [item(5, 1), item(4, 2), item(6, 3)]
    plain, rounded = PackingCollator(10, PAD)(items), PackingCollator(10, PAD, pad_to_multiple=8)(items)
    assert plain["input_ids"].shape[1] == 9 and rounded["input_ids"].shape[1] == 16  # rows [5 + 4], [6]
    width = plain["input_ids"].shape[1]
    assert torch.equal(rounded["input_ids"][:, :width], plain["input_ids"])
    assert torch.equal(rounded["labels"][:, :width], plain["labels"]) and (rounded["labels"][:, width:] == IGNORE_INDEX).all()
    assert rounded["num_tokens"] == plain["num_tokens"] and rounded["num_label_tokens"] == plain["num_label_tokens"]
    # each row's padding tail is one more sequence: samples keep their own position ids
    assert packed_sequence_lengths(rounded["position_ids"]) == [5, 4, 7, 6, 10]


def test_token_budget_groups_fill_up_to_the_budget_in_order():
    lengths = [4, 3, 5, 2, 6, 1, 7]
    groups = list(token_budget_groups(range(len(lengths)), 8, lambda i: lengths[i]))
    assert [g for g, _ in groups] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [nxt for _, nxt in groups] == [2, 4, 6, None]
    assert all(sum(lengths[i] for i in g) <= 8 for g, _ in groups)


def test_token_budget_group_depends_only_on_the_items_from_its_start():
    lengths = [5, 2, 4, 4, 3, 6, 2]
    full = [g for g, _ in token_budget_groups(range(7), 9, lambda i: lengths[i])]
    from_third = [g for g, _ in token_budget_groups(range(2, 7), 9, lambda i: lengths[i])]
    assert full[1:] == from_third


def test_an_item_longer_than_the_budget_is_a_group_of_its_own():
    groups = [g for g, _ in token_budget_groups([2, 12, 3], 8, lambda n: n)]
    assert groups == [[2], [12], [3]]


def test_first_fit_fills_earlier_rows_first():
    assert pack_sequences([6, 5, 4, 3], max_length=10) == [[0, 2], [1, 3]]


def test_sample_longer_than_the_packing_length_is_rejected():
    with pytest.raises(ValueError, match="sample 1 has 12 tokens"):
        pack_sequences([3, 12], max_length=10)


def packed(lengths, max_length=10, **kw):
    items = [item(n, tag, **kw) for tag, n in enumerate(lengths)]
    return items, PackingCollator(max_length, PAD)(items)


def test_packing_preserves_every_token_and_label():
    items, batch = packed([6, 5, 4, 3])
    ids, labels = batch["input_ids"], batch["labels"]
    real = ids != PAD
    assert Counter(ids[real].tolist()) == Counter(torch.cat([it["input_ids"] for it in items]).tolist())
    expected = Counter(l for it in items for l in it["labels"][1:].tolist() if l != IGNORE_INDEX)
    assert Counter(labels[labels != IGNORE_INDEX].tolist()) == expected
    assert batch["num_tokens"] == 18 and batch["attention_mask"] is None


def test_packed_rows_respect_the_length_and_count():
    _, batch = packed([6, 5, 4, 3])
    assert batch["input_ids"].shape == (2, 10)


def test_position_ids_restart_at_each_sample():
    _, batch = packed([6, 5, 4, 3])
    assert batch["position_ids"][0].tolist() == list(range(6)) + list(range(4))
    assert batch["position_ids"][1].tolist() == list(range(5)) + list(range(3)) + [0, 1]  # padding run last
    assert packed_sequence_lengths(batch["position_ids"]) == [6, 4, 5, 3, 2]
    assert cu_seqlens_from_position_ids(batch["position_ids"]).tolist() == [0, 6, 10, 15, 18, 20]


def test_packed_batch_names_its_samples_for_varlen_attention_on_the_host():
    """cu_seq_lens over the flattened rows (padding runs included) and the longest sample as a Python int."""
    _, batch = packed([6, 5, 4, 3])
    for side in ("q", "k"):
        assert batch[f"cu_seq_lens_{side}"].dtype == torch.int32 and not batch[f"cu_seq_lens_{side}"].is_cuda
        assert batch[f"cu_seq_lens_{side}"].tolist() == [0, 6, 10, 15, 18, 20]
        assert batch[f"max_length_{side}"] == 6 and type(batch[f"max_length_{side}"]) is int


def test_no_label_at_any_sample_start():
    _, batch = packed([6, 5, 4, 3])
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()


def test_images_and_boxes_follow_token_order():
    items, batch = packed([6, 5, 4, 3, 3], image=True)
    flat = batch["input_ids"].reshape(-1)
    run_starts = (flat == IMG).nonzero().flatten()
    tags_in_token_order = [int(flat[p + 1]) - 100 for p in run_starts]
    assert [int(p[0, 0, 0]) for p in batch["pixel_values"]] == tags_in_token_order
    assert [round(float(b[0, 0]) * 100) for b in batch["boxes"]] == tags_in_token_order
    assert tags_in_token_order != sorted(tags_in_token_order)  # the check is not trivially satisfied


def test_packing_skips_text_only_samples_in_the_image_list():
    _, batch = packed([4, 4], image=False)
    assert batch["pixel_values"] is None and batch["boxes"] == []


# ------------------------------------------------------------------------------------------- samplers
def test_parse_mixture_reads_ratios_and_plain_paths():
    assert parse_mixture("a.jsonl:0.7, b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert parse_mixture("c.jsonl") == [("c.jsonl", None)]


def test_mixture_draws_each_source_by_its_normalised_ratio():
    sampler = MixtureSampler([10, 100], ratios=[7, 3], num_samples=100, seed=0)
    order = list(sampler)
    assert len(order) == 100
    assert sum(i < 10 for i in order) == 70  # source a is small: repeated in fresh permutations
    assert Counter(i for i in order if i < 10) == Counter({i: 7 for i in range(10)})


def test_mixture_without_ratios_is_proportional_to_size():
    sampler = MixtureSampler([30, 10], seed=1)
    assert sorted(sampler) == list(range(40))


def test_mixture_is_deterministic_per_seed_and_epoch():
    a, b = MixtureSampler([20, 20], [0.5, 0.5], seed=3), MixtureSampler([20, 20], [0.5, 0.5], seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_mixing_ratio_for_only_some_files_is_a_config_error():
    with pytest.raises(ConfigError, match="every data file"):
        MixtureSampler([5, 5], ratios=[0.5, None])


@pytest.mark.parametrize("make", [
    lambda r, w: MixtureSampler([13, 8], [0.6, 0.4], seed=5, rank=r, world_size=w),
    lambda r, w: LengthGroupedSampler(np.arange(21) % 7, batch_size=2, megabatch_mult=2, seed=5, rank=r, world_size=w),
])
def test_ranks_get_equal_counts_and_cover_the_epoch(make):
    shards = [list(make(r, 3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*map(set, shards)) == set(make(0, 1).global_order(0).tolist())


@pytest.mark.parametrize("make", [
    lambda: MixtureSampler([13, 8], [0.6, 0.4], seed=5, rank=1, world_size=2),
    lambda: LengthGroupedSampler(np.arange(21) % 7, batch_size=2, seed=5, rank=1, world_size=2),
])
def test_resume_from_a_position_continues_exactly(make):
    full = make()
    full.set_epoch(2)
    expected = list(full)
    resumed = make()
    resumed.load_state_dict(full.state_dict(num_consumed=7))
    assert list(resumed) == expected[7:] and len(resumed) == len(expected) - 7


def test_length_grouping_sorts_each_megabatch_longest_first():
    lengths = np.random.default_rng(0).integers(1, 100, size=40)
    sampler = LengthGroupedSampler(lengths, batch_size=4, megabatch_mult=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(40))
    for start in range(0, 40, 8):
        mega = lengths[order[start : start + 8]]
        assert (np.diff(mega) <= 0).all()


def test_length_grouping_keeps_a_step_inside_one_megabatch_across_ranks():
    lengths = np.arange(16)
    shards = [list(LengthGroupedSampler(lengths, batch_size=2, megabatch_mult=1, seed=0, rank=r, world_size=2)) for r in range(2)]
    for step in range(4):
        together = shards[0][2 * step : 2 * step + 2] + shards[1][2 * step : 2 * step + 2]
        assert (np.diff(lengths[together]) <= 0).all()


def test_length_grouping_works_when_every_sample_has_the_same_modality():
    sampler = LengthGroupedSampler([50] * 9, batch_size=4, seed=0)
    order = list(sampler)
    assert set(order) == set(range(9)) and len(order) == 12  # padded to whole batches by wrapping
