"""gpt4roi_sft.data.schema: the box convention and the record rules that converters, dataset and eval share."""

import pytest

from data_converters.common import write_jsonl
from gpt4roi_sft.data.schema import check_box, coco_box_to_xyxy, validate_boxes, validate_record, xywh_to_xyxy
from gpt4roi_sft.errors import BoxError, DataError


def record(**changes):
    rec = {"id": "r/0", "image": "a.jpg", "width": 64, "height": 48,
           "regions": [{"bbox": [2.0, 3.0, 22.0, 13.0]}],
           "conversations": [{"from": "human", "value": "<image>\nWhat is region1 <bbox>?"},
                             {"from": "gpt", "value": "a red square"}]}
    rec.update(changes)
    return rec


def test_xywh_becomes_xyxy_without_clipping():
    assert xywh_to_xyxy([60, 3, 20, 10]) == [60.0, 3.0, 80.0, 13.0]


@pytest.mark.parametrize("bbox, match", [([1, 2, 3], "is not \\[x, y, w, h\\]"), (["1", 2, 3, 4], "is not"),
                                         ([1, 2, float("nan"), 4], "non-finite"), ([1, 2, 0, 4], "no area")])
def test_malformed_xywh_is_a_box_error_naming_where(bbox, match):
    with pytest.raises(BoxError, match=f"^train.json: image 7 segment 3: bbox .*{match}"):
        xywh_to_xyxy(bbox, "train.json: image 7 segment 3")


def test_coco_box_is_clipped_to_the_image():
    assert coco_box_to_xyxy([-4, 40, 20, 20], 64, 48, "f") == [0.0, 40.0, 16.0, 48.0]


def test_coco_box_outside_the_image_names_where_and_the_box_as_given():
    with pytest.raises(BoxError, match=r"^f: image 8 annotation 5: bbox \[200, 1, 5, 5\] lies entirely outside the 100x100"):
        coco_box_to_xyxy([200, 1, 5, 5], 100, 100, "f: image 8 annotation 5")


def test_border_crossing_xyxy_box_is_an_error_unless_clipped():
    with pytest.raises(BoxError, match="crosses the border"):
        check_box([-1, 0, 10, 10], 20, 20, "box")
    assert validate_boxes([[-1, 0, 10, 30]], 20, 20, clip=True).tolist() == [[0, 0, 10, 20]]


@pytest.mark.parametrize("bbox", [["2", "3", "22", "13"], [2, 3, 22, 13, 5], [2, 3, 22], [True, 3, 22, 13], "2 3 22 13"])
def test_region_bbox_that_is_not_four_numbers_names_the_line_and_the_field(bbox):
    with pytest.raises(BoxError, match=r"^d\.jsonl line 1: regions\[0\]\.bbox .* is not \[x1, y1, x2, y2\] \(four numbers\)$"):
        validate_record(record(regions=[{"bbox": bbox}]), "d.jsonl line 1")


def test_boxes_given_as_an_array_or_tensor_are_accepted():
    import numpy as np
    import torch

    for boxes in (np.asarray([[2, 3, 22, 13]]), torch.tensor([[2.0, 3.0, 22.0, 13.0]]), [np.asarray([2.0, 3.0, 22.0, 13.0])]):
        assert validate_boxes(boxes, 64, 48).tolist() == [[2, 3, 22, 13]]


def test_valid_record_passes():
    validate_record(record(), "d.jsonl line 1")


def test_misspelt_field_is_an_error_naming_it_and_the_known_fields():
    rec = record()
    rec["regoins"] = rec.pop("regions")
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: unknown field 'regoins' \(a record's fields are id, image, "
                                        r"width, height, regions, conversations, source\)$"):
        validate_record(rec, "d.jsonl line 1")


@pytest.mark.parametrize("changes", [{"id": 7}, {"id": ""}, {"id": None}])
def test_record_id_must_be_a_non_empty_string(changes):
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: field 'id' must be a non-empty string"):
        validate_record(record(**changes), "d.jsonl line 1")


def test_record_without_id_is_an_error():
    rec = record()
    del rec["id"]
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: field 'id' must be a non-empty string \(got None\)"):
        validate_record(rec, "d.jsonl line 1")


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_empty_gpt_answer_names_the_message(answer):
    rec = record()
    rec["conversations"][1]["value"] = answer
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: conversations\[1\]\.value: a 'gpt' answer must not be empty"):
        validate_record(rec, "d.jsonl line 1")


def test_record_with_image_and_no_regions_may_leave_its_size_null():
    rec = record(regions=[], width=None, height=None)
    rec["conversations"][0]["value"] = "<image>\nWhat is here?"
    validate_record(rec, "d.jsonl line 1")


def test_record_with_regions_needs_its_size():
    with pytest.raises(DataError, match="line 1: field 'width' must be a positive number"):
        validate_record(record(width=None), "d.jsonl line 1")


@pytest.mark.parametrize("key", ["width", "height"])
@pytest.mark.parametrize("value", ["64", None, 0, -3, True, False, float("nan"), float("inf")])
def test_bad_record_size_names_the_field(key, value):
    with pytest.raises(DataError, match=rf"^d\.jsonl line 1: field '{key}' must be a positive number \(got {value!r}\)$"):
        validate_record(record(**{key: value}), "d.jsonl line 1")


def test_record_checks_the_image_file_only_when_given_a_root(tmp_path):
    validate_record(record(), "d.jsonl line 1")
    with pytest.raises(DataError, match="image file not found"):
        validate_record(record(), "d.jsonl line 1", image_root=str(tmp_path))


def test_converter_writer_refuses_a_record_that_breaks_the_schema_and_writes_nothing(tmp_path):
    bad = record(id="vg/7/d0", regions=[])
    with pytest.raises(DataError, match=r"out.jsonl: record 2 \(vg/7/d0\): the text has 1 <bbox> token\(s\) but the record has 0"):
        write_jsonl(tmp_path / "out.jsonl", [record(), bad])
    assert not (tmp_path / "out.jsonl").exists()


def test_converter_writer_error_names_the_input_file_and_record_id_given_a_source(tmp_path):
    bad = record(id="vg/7/d0", regions=[])
    with pytest.raises(DataError, match=r"^train\.json: record vg/7/d0 \(out\.jsonl: record 1\): the text has"):
        write_jsonl(tmp_path / "out.jsonl", [bad], source="train.json")


def test_converter_writer_refuses_a_duplicate_id(tmp_path):
    with pytest.raises(DataError, match=r"record 2 \(r/0\): field 'id': 'r/0' is already the id of out.jsonl: record 1"):
        write_jsonl(tmp_path / "out.jsonl", [record(), record()])
