"""Specification of the Pix2Cap-COCO converter, on hand-made files in the real format."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_converters.templates import GPT4ROI_VG
from conftest import run_converter
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
              {"id": 184, "name": "tree-merged", "supercategory": "plant", "isthing": 0}]


def seg(sid, bbox, description="a thing", category_id=1, iscrowd=0, area=100, **extra):
    out = {"id": sid, "category_id": category_id, "iscrowd": iscrowd, "bbox": bbox, "area": area, **extra}
    if description is not None:
        out["description"] = description
    return out


def panoptic(images: dict[int, list[dict]], size=(640, 427)) -> dict:
    return {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": size[0], "height": size[1]} for i in images],
            "annotations": [{"image_id": i, "file_name": f"{i:012d}.png", "segments_info": s} for i, s in images.items()],
            "categories": [dict(c) for c in CATEGORIES]}


def run(tmp_path: Path, data, *args: str, name="pix2cap_coco_train.json"):
    """Run the CLI on ``data`` (a JSON string, or {image_id: segments_info}); return (process, records, stats)."""
    if isinstance(data, dict):
        data = panoptic(data)
    return run_converter(tmp_path, "pix2cap", data, *args, name=name)


def captions(records) -> list[str]:
    return [t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt"]


MIXED = {
    397133: [seg(1, [10, 10, 50, 60], "A man in a dark suit."),
             seg(2, [0, 0, 10, 10], "crowd of people", iscrowd=1),
             seg(3, [5, 5, 20, 20], ""),
             seg(4, [5, 5, 20, 20], None),
             seg(5, [5, 5, 20, 20], "zero area", area=0),
             seg(6, [600, 400, 100, 100], "Un café crème ☕ près de la fenêtre.", category_id=184),
             seg(7, [5, 5, 0.5, 20], "too thin")],
}


def test_record_follows_the_conversation_schema(tmp_path):
    proc, records, _ = run(tmp_path, MIXED)
    assert proc.returncode == 0, proc.stderr
    (r,) = records
    assert r["id"] == "pix2cap/train/397133/d0"
    assert r["image"] == "train2017/000000397133.jpg"
    assert (r["width"], r["height"], r["source"]) == (640, 427, "pix2cap_coco")
    assert {"bbox", "segment_id", "mask", "category"} <= set(r["regions"][0])
    assert r["regions"][0]["mask"] == "panoptic_train2017/000000397133.png"
    assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * len(r["regions"])


def test_crowd_empty_missing_zero_area_and_thin_segments_are_dropped_and_counted(tmp_path):
    _, records, stats = run(tmp_path, MIXED)
    assert sorted(reg["segment_id"] for reg in records[0]["regions"]) == [1, 6]
    assert stats["dropped"] == {"crowd": 1, "empty_description": 1, "missing_description": 1,
                                "zero_area": 1, "box_under_1px": 1}
    assert (stats["images"], stats["records"], stats["regions"]) == (1, 1, 2)


def test_box_is_converted_to_xyxy_and_clipped_to_the_image(tmp_path):
    _, records, _ = run(tmp_path, MIXED)
    boxes = {reg["segment_id"]: reg["bbox"] for reg in records[0]["regions"]}
    assert boxes[1] == [10.0, 10.0, 60.0, 70.0]
    assert boxes[6] == [600.0, 400.0, 640.0, 427.0]


def test_unicode_caption_is_preserved_exactly(tmp_path):
    _, records, _ = run(tmp_path, MIXED)
    assert "Un café crème ☕ près de la fenêtre." in captions(records)
    assert "☕" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")


def test_first_human_turn_has_preamble_and_every_turn_uses_a_gpt4roi_template(tmp_path):
    _, records, _ = run(tmp_path, MIXED)
    humans = [t["value"] for t in records[0]["conversations"] if t["from"] == "human"]
    assert humans[0].startswith(GPT4ROI_PREAMBLE) and GPT4ROI_PREAMBLE not in humans[1]
    for i, text in enumerate(humans, start=1):
        question = text.removeprefix(GPT4ROI_PREAMBLE)
        assert question in {t.replace("<spi_descript>", f"region{i} <bbox>") for t in GPT4ROI_VG}


def test_gpt4roi_template_list_has_twenty_entries_each_with_one_placeholder():
    assert len(GPT4ROI_VG) == 20 and len(set(GPT4ROI_VG)) == 20
    assert all(t.count("<spi_descript>") == 1 for t in GPT4ROI_VG)


def _many(n_images=3, n_segments=37):
    return {100 + i: [seg(j + 1, [j, j, 30, 30], f"caption {i}-{j} ünïcode") for j in range(n_segments)]
            for i in range(n_images)}


def test_image_with_more_than_max_regions_becomes_several_dialogues(tmp_path):
    _, records, _ = run(tmp_path, _many(1, 37))
    assert [r["id"] for r in records] == [f"pix2cap/train/100/d{k}" for k in range(3)]
    assert all(len(r["regions"]) <= 15 for r in records)
    assert sum(len(r["regions"]) for r in records) == 37


def test_every_kept_caption_appears_exactly_once(tmp_path):
    data = _many(3, 37)
    data[100].append(seg(99, [1, 1, 5, 5], ""))
    _, records, stats = run(tmp_path, data, "--max-regions", "7")
    expected = [s["description"] for segs in data.values() for s in segs if s["description"]]
    assert Counter(captions(records)) == Counter(expected)
    assert stats["regions"] == len(expected) and stats["dropped"] == {"empty_description": 1}


def test_bbox_count_equals_regions_in_every_record(tmp_path):
    _, records, _ = run(tmp_path, _many(2, 20), "--max-regions", "6")
    for r in records:
        text = " ".join(t["value"] for t in r["conversations"])
        assert text.count("<bbox>") == len(r["regions"])
        assert text.count("<image>") == 1 and "<image>" in r["conversations"][0]["value"]


def test_region_numbering_restarts_in_each_dialogue(tmp_path):
    _, records, _ = run(tmp_path, _many(1, 20), "--max-regions", "10")
    for r in records:
        humans = [t["value"] for t in r["conversations"] if t["from"] == "human"]
        assert [f"region{i} <bbox>" in h for i, h in enumerate(humans, start=1)] == [True] * len(humans)


def test_same_seed_gives_identical_output_and_another_seed_another_order(tmp_path):
    outputs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        (tmp_path / name).mkdir()
        outputs.append(run(tmp_path / name, _many(1, 30), "--seed", seed)[1])
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_things_only_drops_stuff_segments(tmp_path):
    _, records, stats = run(tmp_path, MIXED, "--things-only")
    assert [reg["segment_id"] for reg in records[0]["regions"]] == [1]
    assert stats["dropped"]["stuff_things_only"] == 1


def test_attributes_of_segments_are_kept_on_regions(tmp_path):
    data = {1: [seg(1, [0, 0, 10, 10], "red circle", attributes={"colour": "red", "kind": "circle"})]}
    _, records, _ = run(tmp_path, data)
    assert records[0]["regions"][0]["attributes"] == {"colour": "red", "kind": "circle"}


def test_box_outside_the_image_is_an_error_naming_file_image_and_segment(tmp_path):
    data = {397133: [seg(1, [10, 10, 5, 5]), seg(3, [700, 10, 20, 20])]}
    proc, records, _ = run(tmp_path, data)
    assert proc.returncode == 2 and not (tmp_path / "out.jsonl").exists()
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "pix2cap_coco_train.json" in line and "image 397133" in line and "segment 3" in line


def test_box_outside_the_image_is_skipped_and_counted_with_skip_bad(tmp_path):
    data = {397133: [seg(1, [10, 10, 5, 5]), seg(3, [700, 10, 20, 20])]}
    proc, records, stats = run(tmp_path, data, "--skip-bad")
    assert proc.returncode == 0
    assert [reg["segment_id"] for reg in records[0]["regions"]] == [1]
    assert stats["dropped"] == {"bad_box": 1}


def test_segment_without_bbox_is_an_error_naming_the_segment(tmp_path):
    data = {5: [{"id": 9, "category_id": 1, "iscrowd": 0, "area": 10, "description": "x"}]}
    proc, _, _ = run(tmp_path, data)
    assert proc.returncode == 2 and "image 5 segment 9" in proc.stderr and "bbox" in proc.stderr


def one_line_error(proc) -> str:
    """The converter's stderr, checked to be a single line without a traceback."""
    line = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in line and "Traceback" not in line, proc.stderr
    return line


def test_repeated_segment_id_in_an_image_is_an_error_naming_both_segments(tmp_path):
    data = {5: [seg(3, [0, 0, 10, 10], "left"), seg(4, [0, 0, 10, 10]), seg(3, [20, 20, 10, 10], "right")]}
    line = one_line_error(run(tmp_path, data)[0])
    assert "pix2cap_coco_train.json: image 5" in line and "segment id 3" in line
    assert "segments_info[0]" in line and "segments_info[2]" in line


def test_repeated_segment_id_is_dropped_and_counted_with_skip_bad(tmp_path):
    data = {5: [seg(3, [0, 0, 10, 10], "left"), seg(3, [20, 20, 10, 10], "right")]}
    _, records, stats = run(tmp_path, data, "--skip-bad")
    assert captions(records) == ["left"] and stats["dropped"] == {"duplicate_segment_id": 1}


def test_image_annotated_twice_is_an_error_naming_both_annotations(tmp_path):
    data = panoptic({5: [seg(1, [0, 0, 10, 10])], 6: [seg(1, [0, 0, 10, 10])]})
    data["annotations"].append(dict(data["annotations"][0]))
    line = one_line_error(run(tmp_path, json.dumps(data))[0])
    assert "image_id 5" in line and "annotations[0]" in line and "annotations[2]" in line


def test_image_listed_twice_is_an_error_naming_both_entries(tmp_path):
    data = panoptic({5: [seg(1, [0, 0, 10, 10])]})
    data["images"].append(dict(data["images"][0], file_name="other.jpg"))
    line = one_line_error(run(tmp_path, json.dumps(data))[0])
    assert "image id 5" in line and "images[0]" in line and "images[1]" in line


def test_unlisted_category_id_is_an_error_naming_the_segment_and_field(tmp_path):
    data = {5: [seg(1, [0, 0, 10, 10]), seg(2, [0, 0, 10, 10], category_id=999)]}
    line = one_line_error(run(tmp_path, data)[0])
    assert "pix2cap_coco_train.json: image 5 segment 2" in line and "category_id 999" in line


def test_unlisted_category_id_is_dropped_and_counted_with_skip_bad(tmp_path):
    data = {5: [seg(1, [0, 0, 10, 10]), seg(2, [0, 0, 10, 10], category_id=999)]}
    _, records, stats = run(tmp_path, data, "--skip-bad")
    assert [r["segment_id"] for r in records[0]["regions"]] == [1] and stats["dropped"] == {"unknown_category": 1}


def test_category_id_listed_twice_is_an_error_naming_both_entries_even_with_skip_bad(tmp_path):
    data = panoptic({5: [seg(1, [0, 0, 10, 10])]})
    data["categories"].append({"id": 1, "name": "rider", "isthing": 1})
    line = one_line_error(run(tmp_path, json.dumps(data), "--skip-bad")[0])
    assert "categories[2]" in line and "categories[0]" in line and "'person'" in line and "'rider'" in line


@pytest.mark.parametrize("cid", [[1], None, True, 1.5])
def test_category_id_that_is_not_an_integer_is_an_error_naming_the_entry(tmp_path, cid):
    data = panoptic({5: [seg(1, [0, 0, 10, 10])]})
    data["categories"][1]["id"] = cid
    line = one_line_error(run(tmp_path, json.dumps(data))[0])
    assert "categories[1]" in line and "id must be an integer or a string" in line


@pytest.mark.parametrize("iscrowd", ["0", "1", 2, None, 0.5])
def test_iscrowd_other_than_0_or_1_is_an_error_naming_the_segment_and_field(tmp_path, iscrowd):
    line = one_line_error(run(tmp_path, {5: [seg(2, [0, 0, 10, 10], iscrowd=iscrowd)]})[0])
    assert "image 5 segment 2" in line and f"iscrowd {iscrowd!r}" in line


def test_iscrowd_as_bool_is_read_as_0_or_1(tmp_path):
    _, records, stats = run(tmp_path, {5: [seg(1, [0, 0, 10, 10], iscrowd=False), seg(2, [0, 0, 9, 9], iscrowd=True)]})
    assert [r["segment_id"] for r in records[0]["regions"]] == [1] and stats["dropped"] == {"crowd": 1}


@pytest.mark.parametrize("area", ["big", None, [100], True])
def test_non_numeric_area_is_an_error_naming_the_segment_and_field(tmp_path, area):
    line = one_line_error(run(tmp_path, {5: [seg(2, [0, 0, 10, 10], area=area)]})[0])
    assert "image 5 segment 2" in line and f"area {area!r}" in line


@pytest.mark.parametrize("key", ["width", "height"])
@pytest.mark.parametrize("size", ["640", None, 0, True])
def test_bad_image_size_is_an_error_naming_the_image_and_field(tmp_path, key, size):
    data = panoptic({5: [seg(1, [0, 0, 10, 10])]})
    data["images"][0][key] = size
    line = one_line_error(run(tmp_path, json.dumps(data))[0])
    assert "pix2cap_coco_train.json: images[0] (image 5)" in line and f"{key} {size!r}" in line


@pytest.mark.parametrize("token", ["<bbox>", "<image>"])
def test_description_holding_a_record_token_is_an_error_naming_the_segment_not_the_output(tmp_path, token):
    data = {5: [seg(1, [0, 0, 10, 10]), seg(2, [0, 0, 10, 10], f"a {token} here")]}
    line = one_line_error(run(tmp_path, data)[0])
    assert "pix2cap_coco_train.json: image 5 segment 2" in line and f"description holds {token}" in line
    assert "out.jsonl" not in line


def test_description_holding_a_record_token_is_dropped_and_counted_with_skip_bad(tmp_path):
    data = {5: [seg(1, [0, 0, 10, 10]), seg(2, [0, 0, 10, 10], "a <bbox> here")]}
    _, records, stats = run(tmp_path, data, "--skip-bad")
    assert [r["segment_id"] for r in records[0]["regions"]] == [1]
    assert stats["dropped"] == {"token_in_description": 1}


@pytest.mark.parametrize("text", ['{"images": [{"id": 1, "file_na', "not json at all", ""])
def test_truncated_or_invalid_json_exits_2_with_one_line_naming_the_file(tmp_path, text):
    proc, records, stats = run(tmp_path, text)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "pix2cap_coco_train.json" in proc.stderr and "line 1" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists() and stats is None


def test_failed_run_leaves_no_output_file_and_keeps_an_older_one(tmp_path):
    data = {1: [seg(1, [1, 1, 5, 5])], 2: [seg(3, [900, 900, 5, 5])]}
    (tmp_path / "out.jsonl").write_text("old\n")
    proc, _, _ = run(tmp_path, data)
    assert proc.returncode == 2
    assert (tmp_path / "out.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl")] == []


def test_converts_synthetic_dataset_with_val_paths(tmp_path):
    from data_converters.synthetic import generate

    generate(tmp_path, train_images=0, val_images=4, seed=3)
    out = tmp_path / "val.jsonl"
    proc = subprocess.run([sys.executable, "-m", "data_converters.pix2cap", "--annotations",
                           str(tmp_path / "annotations" / "pix2cap_coco_val.json"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["id"].startswith("pix2cap/val/") and (tmp_path / r["image"]).is_file()
        assert all((tmp_path / reg["mask"]).is_file() for reg in r["regions"])
