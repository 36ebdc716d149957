"""ConversationDataset: lazy JSONL reading, validation with file/line errors, tokens, boxes and masks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.data.dataset import ConversationDataset, index_jsonl
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.errors import BoxError, DataError
from gpt4roi_sft.tokenization import train_llama_like_tokenizer

IMAGE_ID = 4  # "<image>" in the tiny tokenizer; the model's image token id is a separate number below
MODEL_IMAGE_ID = 7
NUM_IMAGE_TOKENS = 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_llama_like_tokenizer(
        ["### Human: what is region1? \n ### Assistant: a red square on grass. \n ### blue circle sky"], vocab_size=300
    )


def region_record(rid="r0", n_pairs=2, image="img.png", **extra):
    conv, regions = [], []
    for k in range(n_pairs):
        prefix = "<image>\n" if k == 0 else ""
        conv += [
            {"from": "human", "value": f"{prefix}What is region{k + 1} <bbox>?"},
            {"from": "gpt", "value": f"a red square {k}."},
        ]
        regions.append({"bbox": [2.0 + k, 4.0, 20.0, 16.0], "segment_id": k + 1, "mask": "pan.png"})
    rec = {"id": rid, "image": image, "width": 32, "height": 24, "regions": regions, "conversations": conv}
    rec.update(extra)
    return rec


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (32, 24), (200, 30, 30)).save(tmp_path / "img.png")
    pan = np.zeros((24, 32, 3), dtype=np.uint8)
    pan[4:16, 2:20] = (1, 0, 0)  # segment 1
    pan[4:16, 20:32] = (2, 1, 0)  # segment 2 + 256 = 258
    Image.fromarray(pan).save(tmp_path / "pan.png")
    return tmp_path


def make(path, root, tokenizer, **kw):
    kw.setdefault("image_transform", ImageTransform(size=28))
    return ConversationDataset(path, str(root), tokenizer, image_token_id=MODEL_IMAGE_ID, num_image_tokens=NUM_IMAGE_TOKENS, **kw)


def test_index_records_byte_offsets_of_non_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ['{"a": 1}', "", '{"b": 22}'])
    ix = index_jsonl(path)
    assert ix.offsets.tolist() == [0, 10] and ix.line_numbers.tolist() == [1, 3]
    with open(path, "rb") as f:
        f.seek(ix.offsets[1])
        assert json.loads(f.read(ix.sizes[1])) == {"b": 22}


def test_item_has_the_contract_fields_and_shapes(tmp_path, root, tokenizer):
    ds = make(write_jsonl(tmp_path / "d.jsonl", [region_record()]), root, tokenizer)
    item = ds[0]
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
    assert item["pixel_values"].shape == (3, 28, 28)
    assert item["boxes"].shape == (2, 4) and item["id"] == "r0" and item["num_dropped_turns"] == 0
    assert "region_masks" not in item


def test_image_token_expands_to_untrained_model_image_tokens(tmp_path, root, tokenizer):
    ds = make(write_jsonl(tmp_path / "d.jsonl", [region_record()]), root, tokenizer)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    where = (ids == MODEL_IMAGE_ID).nonzero().flatten().tolist()
    assert len(where) == NUM_IMAGE_TOKENS and where == list(range(where[0], where[0] + NUM_IMAGE_TOKENS))
    assert (labels[where] == IGNORE_INDEX).all() and IMAGE_ID not in ids.tolist()


def test_boxes_are_fractions_of_the_square(tmp_path, root, tokenizer):
    ds = make(write_jsonl(tmp_path / "d.jsonl", [region_record()]), root, tokenizer)
    assert torch.allclose(ds[0]["boxes"][0], torch.tensor([2 / 32, 4 / 24, 20 / 32, 16 / 24]))


def test_answers_are_trained(tmp_path, root, tokenizer):
    ds = make(write_jsonl(tmp_path / "d.jsonl", [region_record()]), root, tokenizer)
    item = ds[0]
    trained = item["input_ids"][item["labels"] != IGNORE_INDEX].tolist()
    assert "a red square 1." in tokenizer.decode(trained)


def test_truncation_drops_trailing_turns_and_their_regions(tmp_path, root, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [region_record(n_pairs=3)])
    full = make(path, root, tokenizer)[0]
    short = make(path, root, tokenizer, max_length=len(full["input_ids"]) - 1)[0]
    assert short["num_dropped_turns"] == 2 and short["boxes"].shape == (2, 4)
    assert len(short["input_ids"]) <= len(full["input_ids"]) - 1
    assert torch.equal(short["boxes"], full["boxes"][:2])


def test_record_without_image_has_no_pixel_values(tmp_path, root, tokenizer):
    rec = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "sky"}]}
    item = make(write_jsonl(tmp_path / "d.jsonl", [rec]), root, tokenizer)[0]
    assert item["pixel_values"] is None and item["boxes"].shape == (0, 4)
    assert MODEL_IMAGE_ID not in item["input_ids"].tolist()


def test_image_record_without_regions_or_size_is_an_image_item(tmp_path, root, tokenizer):
    rec = {"id": "t", "image": "img.png", "width": None, "height": None,
           "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "sky"}]}
    item = make(write_jsonl(tmp_path / "d.jsonl", [rec]), root, tokenizer)[0]
    assert item["pixel_values"].shape == (3, 28, 28) and item["boxes"].shape == (0, 4)


def test_region_masks_come_from_the_panoptic_png(tmp_path, root, tokenizer):
    rec = region_record()
    rec["regions"][1]["segment_id"] = 258
    ds = make(write_jsonl(tmp_path / "d.jsonl", [rec]), root, tokenizer, image_transform=ImageTransform(size=32), load_masks=True)
    masks = ds[0]["region_masks"]
    assert masks.shape == (2, 32, 32)
    assert masks[0].sum() > 0 and masks[1].sum() > 0 and (masks[0] * masks[1]).sum() == 0
    assert masks[0][12, 10] == 1 and masks[1][12, 30] == 1  # rows scale 24 -> 32


def test_border_crossing_box_is_clipped(tmp_path, root, tokenizer):
    rec = region_record(n_pairs=1)
    rec["regions"][0]["bbox"] = [-5, 4, 40, 16]
    item = make(write_jsonl(tmp_path / "d.jsonl", [rec]), root, tokenizer)[0]
    assert item["boxes"][0, 0] == 0 and item["boxes"][0, 2] == 1


def bad(path_factory, root, tokenizer, records, **kw):
    return make(write_jsonl(path_factory, records), root, tokenizer, **kw)


def test_invalid_json_names_file_and_line(tmp_path, root, tokenizer):
    ds = bad(tmp_path / "d.jsonl", root, tokenizer, [region_record(), '{"id": "x", "conv'])
    with pytest.raises(DataError, match=r"d\.jsonl line 2: invalid JSON"):
        ds[1]


def test_bbox_count_mismatch_names_both_counts(tmp_path, root, tokenizer):
    rec = region_record()
    rec["regions"].pop()
    with pytest.raises(DataError, match=r"line 1: the text has 2 <bbox> token\(s\) but the record has 1 region"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [rec])[0]


def test_region_without_bbox_is_an_error(tmp_path, root, tokenizer):
    rec = region_record()
    del rec["regions"][1]["bbox"]
    with pytest.raises(DataError, match="region 1 has no 'bbox'"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [rec])[0]


@pytest.mark.parametrize("box, match", [([100, 100, 120, 120], "entirely outside"), ([5, 5, 5, 9], "empty"),
                                        ([1, 2, 30, 20, 5], r"regions\[0\]\.bbox .* is not \[x1, y1, x2, y2\]"),
                                        (["2", "4", "20", "16"], r"regions\[0\]\.bbox .* is not \[x1, y1, x2, y2\]")])
def test_bad_boxes_are_box_errors_naming_the_line(tmp_path, root, tokenizer, box, match):
    rec = region_record(n_pairs=1)
    rec["regions"][0]["bbox"] = box
    with pytest.raises(BoxError, match=f"line 1.*{match}"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [rec])[0]


def test_missing_image_file_names_the_path(tmp_path, root, tokenizer):
    with pytest.raises(DataError, match=r"line 1: image file not found: .*nope\.jpg"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [region_record(image="nope.jpg")])[0]


def test_image_token_outside_the_first_turn_is_an_error(tmp_path, root, tokenizer):
    rec = region_record()
    rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    rec["conversations"][2]["value"] = "<image> " + rec["conversations"][2]["value"]
    with pytest.raises(DataError, match="exactly once, in the first human turn"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [rec])[0]


def test_conversation_ending_with_human_is_an_error(tmp_path, root, tokenizer):
    rec = region_record(n_pairs=1)
    rec["conversations"].append({"from": "human", "value": "more?"})
    with pytest.raises(DataError, match="line 1.*end with a 'gpt'"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [rec])[0]


def test_skip_bad_records_replaces_and_counts(tmp_path, root, tokenizer, caplog):
    ds = bad(tmp_path / "d.jsonl", root, tokenizer, ["not json", region_record("good")], skip_bad_records=True)
    with caplog.at_level("WARNING"):
        assert ds[0]["id"] == "good"
    assert ds.num_skipped == 1 and "d.jsonl line 1" in caplog.text


def test_validate_all_reports_every_bad_record(tmp_path, root, tokenizer):
    recs = ["not json", region_record("ok"), region_record(image="gone.png")]
    ds = bad(tmp_path / "d.jsonl", root, tokenizer, recs)
    errors = ds.validate_all(raise_on_error=False)
    assert len(errors) == 2 and "line 1" in errors[0] and "line 3" in errors[1]
    with pytest.raises(DataError, match="2 bad record"):
        ds.validate_all()


def test_several_files_concatenate_and_report_sizes(tmp_path, root, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [region_record("a0"), region_record("a1")])
    b = write_jsonl(tmp_path / "b.jsonl", [region_record("b0")])
    ds = make([a, b], root, tokenizer)
    assert len(ds) == 3 and ds.source_sizes == [2, 1] and ds[2]["id"] == "b0"


def test_lengths_are_cheap_estimates_that_grow_with_the_record(tmp_path, root, tokenizer):
    ds = make(write_jsonl(tmp_path / "d.jsonl", [region_record(n_pairs=1), region_record(n_pairs=3)]), root, tokenizer)
    lengths = ds.lengths()
    assert lengths.shape == (2,) and lengths[1] > lengths[0] > NUM_IMAGE_TOKENS


def test_item_equals_the_processor_encoding_of_the_rendered_conversation(tmp_path, root, tokenizer):
    from gpt4roi_sft.conversation import render_segments
    from gpt4roi_sft.model.processing import GPT4RoIProcessor

    record = region_record()
    transform = ImageTransform(size=28)
    ds = ConversationDataset(write_jsonl(tmp_path / "d.jsonl", [record]), str(root), tokenizer, transform,
                             image_token_id=IMAGE_ID, num_image_tokens=NUM_IMAGE_TOKENS)
    item = ds[0]
    processor = GPT4RoIProcessor(tokenizer, transform, NUM_IMAGE_TOKENS)
    text = "".join(t for t, _ in render_segments("gpt4roi_v0", record["conversations"]))
    out = processor(images=[Image.open(root / "img.png")], texts=[text], boxes=[[r["bbox"] for r in record["regions"]]])
    assert torch.equal(out["input_ids"][0], item["input_ids"])
    assert torch.equal(out["pixel_values"][0], item["pixel_values"]) and torch.equal(out["boxes"][0], item["boxes"])


def test_duplicate_id_is_an_error_naming_both_lines(tmp_path, root, tokenizer):
    ds = bad(tmp_path / "d.jsonl", root, tokenizer, [region_record("a"), region_record("b"), region_record("a")])
    errors = ds.validate_all(raise_on_error=False)
    assert errors == [f"{tmp_path / 'd.jsonl'} line 3: field 'id': 'a' is already the id of {tmp_path / 'd.jsonl'} line 1"]


def test_the_same_id_in_two_files_is_not_a_duplicate(tmp_path, root, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [region_record("x")])
    b = write_jsonl(tmp_path / "b.jsonl", [region_record("x")])
    assert make([a, b], root, tokenizer).validate_all() == []


def test_image_with_another_aspect_ratio_than_the_record_size_is_an_error(tmp_path, root, tokenizer):
    with pytest.raises(DataError, match=r"d\.jsonl line 1: fields 'width', 'height' say 64x24, but the image img\.png "
                                        r"is 32x24, another aspect ratio"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [region_record(width=64)])[0]


def test_uniformly_rescaled_image_scales_the_boxes(tmp_path, root, tokenizer):
    Image.new("RGB", (16, 12), (200, 30, 30)).save(root / "half.png")
    rec = region_record(n_pairs=1, image="half.png", width=31, height=24)  # 31 * 0.5 rounds to 16
    item = make(write_jsonl(tmp_path / "d.jsonl", [rec]), root, tokenizer)[0]
    assert torch.allclose(item["boxes"][0], torch.tensor([2 / 31, 4 / 24, 20 / 31, 16 / 24]), atol=1e-6)


def test_file_without_records_is_an_error_naming_it(tmp_path, root, tokenizer):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty or holds only blank lines\)"):
        make(path, root, tokenizer)


@pytest.mark.parametrize("segment_id", ["abc", 1.5, None, True, -1])
def test_segment_id_that_is_not_an_integer_names_the_line_and_the_field(tmp_path, root, tokenizer, segment_id):
    rec = region_record()
    rec["regions"][1]["segment_id"] = segment_id
    with pytest.raises(DataError, match=r"d\.jsonl line 1: regions\[1\]\.segment_id must be a non-negative integer"):
        bad(tmp_path / "d.jsonl", root, tokenizer, [rec], load_masks=True)[0]
