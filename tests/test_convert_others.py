"""Specification of the VG (GRiT), RefCOCOg (MDETR) and LLaVA-Instruct converters."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from conftest import run_converter
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, module: str, data, *args: str, name="input.json"):
    return run_converter(tmp_path, module, data, *args, name=name)


def gpt_turns(records) -> list[str]:
    return [t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt"]


def vg_file(n_regions: int = 40) -> dict:
    anns = [{"id": k + 1, "image_id": 7, "bbox": [k, k, 20, 10], "caption": f"region caption {k} é", "area": 200,
             "category_id": 1} for k in range(n_regions)]
    anns += [{"id": 900, "image_id": 8, "bbox": [1, 1, 5, 5], "caption": "", "area": 25},
             {"id": 901, "image_id": 8, "bbox": [90, 1, 50, 5], "caption": "crosses the right border", "area": 25}]
    return {"images": [{"id": 7, "file_name": "7.jpg", "width": 500, "height": 333},
                       {"id": 8, "file_name": "8.jpg", "width": 100, "height": 100}],
            "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def test_vg_splits_regions_into_dialogues_of_at_most_15_and_loses_no_caption(tmp_path):
    proc, records, stats = run(tmp_path, "vg", vg_file(40), "--image-dir-prefix", "vg/images")
    assert proc.returncode == 0, proc.stderr
    seven = [r for r in records if r["image"] == "vg/images/7.jpg"]
    assert [len(r["regions"]) for r in seven] == [14, 13, 13]
    assert Counter(gpt_turns(seven)) == Counter(f"region caption {k} é" for k in range(40))
    assert stats["dropped"] == {"empty_caption": 1}


def test_vg_records_have_matching_bbox_counts_and_preamble(tmp_path):
    _, records, _ = run(tmp_path, "vg", vg_file(20))
    for r in records:
        text = " ".join(t["value"] for t in r["conversations"])
        assert text.count("<bbox>") == len(r["regions"]) and text.count("<image>") == 1
        assert r["conversations"][0]["value"].startswith(GPT4ROI_PREAMBLE)
        assert r["id"].startswith("vg/") and r["source"] == "vg"


def test_vg_clips_border_crossing_boxes(tmp_path):
    _, records, _ = run(tmp_path, "vg", vg_file(1))
    (eight,) = [r for r in records if r["image"] == "8.jpg"]
    assert eight["regions"][0]["bbox"] == [90.0, 1.0, 100.0, 6.0]


def test_vg_box_outside_image_is_an_error_naming_image_and_annotation(tmp_path):
    data = vg_file(1)
    data["annotations"].append({"id": 555, "image_id": 8, "bbox": [200, 1, 5, 5], "caption": "x", "area": 25})
    proc, _, _ = run(tmp_path, "vg", data)
    assert proc.returncode == 2 and "image 8 annotation 555" in proc.stderr and "outside" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_vg_non_numeric_area_is_an_error_naming_image_annotation_and_field(tmp_path):
    data = vg_file(1)
    data["annotations"][0]["area"] = "200"
    proc, _, _ = run(tmp_path, "vg", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "input.json: image 7 annotation 1" in proc.stderr and "area '200'" in proc.stderr


def test_vg_bad_image_size_is_an_error_naming_the_image_and_field(tmp_path):
    data = vg_file(1)
    data["images"][1]["height"] = "100"
    proc, _, _ = run(tmp_path, "vg", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "input.json: images[1] (image 8): height '100'" in proc.stderr


def test_vg_image_listed_twice_is_an_error_naming_both_entries(tmp_path):
    """Its annotations would go to two sets of dialogues with the same record ids."""
    data = vg_file(1)
    data["images"][1]["id"] = data["images"][0]["id"]
    proc, _, _ = run(tmp_path, "vg", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "input.json: image id 7 appears twice (images[0] and images[1])" in proc.stderr


def test_vg_caption_holding_a_record_token_is_an_error_naming_the_annotation_not_the_output(tmp_path):
    data = vg_file(2)
    data["annotations"][1]["caption"] = "<image> of a dog"
    proc, _, _ = run(tmp_path, "vg", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "input.json: image 7 annotation 2: caption holds <image>" in proc.stderr and "out.jsonl" not in proc.stderr


def refcocog_file() -> dict:
    return {"images": [{"id": 1, "file_name": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480,
                        "caption": "the bowl of oranges on the left", "original_id": 9},
                       {"id": 2, "file_name": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480,
                        "caption": "", "original_id": 9},
                       {"id": 3, "file_name": "COCO_train2014_000000000025.jpg", "width": 100, "height": 80,
                        "caption": "la girafe à droite", "original_id": 25}],
            "annotations": [{"id": 10, "image_id": 1, "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0,
                             "category_id": 51},
                            {"id": 11, "image_id": 2, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0,
                             "category_id": 51},
                            {"id": 12, "image_id": 3, "bbox": [50, 40, 80, 80], "area": 100, "iscrowd": 0,
                             "category_id": 25}],
            "categories": []}


def test_refcocog_makes_one_single_region_record_per_expression(tmp_path):
    proc, records, stats = run(tmp_path, "refcocog", refcocog_file(), "--image-dir-prefix", "coco/train2014",
                               name="finetune_refcocog_train.json")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in records] == ["refcocog/train/1", "refcocog/train/3"]
    assert [len(r["regions"]) for r in records] == [1, 1]
    assert gpt_turns(records) == ["the bowl of oranges on the left", "la girafe à droite"]
    assert records[0]["regions"][0]["bbox"] == [1.0, 2.0, 31.0, 42.0]
    assert records[1]["regions"][0]["bbox"] == [50.0, 40.0, 100.0, 80.0]
    assert records[0]["image"] == "coco/train2014/COCO_train2014_000000000009.jpg"
    assert "region1 <bbox>" in records[0]["conversations"][0]["value"]
    assert stats["dropped"] == {"empty_caption": 1}


def llava_file() -> list:
    return [{"id": "000000033471", "image": "000000033471.jpg",
             "conversations": [{"from": "human", "value": "What colors are the bus?\n<image>"},
                               {"from": "gpt", "value": "White and red."},
                               {"from": "human", "value": "Where is it?"},
                               {"from": "gpt", "value": "On a street ☂."}]},
            {"id": "000000052846", "image": "000000052846.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat is the cat doing?"},
                               {"from": "gpt", "value": "Sleeping."}]}]


def test_llava_instruct_keeps_image_once_at_the_start_of_the_first_turn(tmp_path):
    proc, records, stats = run(tmp_path, "llava_instruct", llava_file(), "--image-dir-prefix", "coco/train2017")
    assert proc.returncode == 0, proc.stderr
    assert [r["conversations"][0]["value"] for r in records] == ["<image>\nWhat colors are the bus?",
                                                                 "<image>\nWhat is the cat doing?"]
    for r in records:
        assert r["regions"] == [] and " ".join(t["value"] for t in r["conversations"]).count("<image>") == 1
    assert records[0]["id"] == "llava_instruct/000000033471"
    assert records[0]["image"] == "coco/train2017/000000033471.jpg"
    assert records[0]["conversations"][3]["value"] == "On a street ☂."
    assert stats["records"] == 2


def test_llava_instruct_reads_image_sizes_when_given_an_image_root(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "000000033471.jpg")
    Image.new("RGB", (30, 20)).save(tmp_path / "000000052846.jpg")
    _, records, _ = run(tmp_path, "llava_instruct", llava_file(), "--image-root", str(tmp_path))
    assert [(r["width"], r["height"]) for r in records] == [(64, 48), (30, 20)]


def test_llava_instruct_missing_image_is_an_error_naming_the_entry(tmp_path):
    proc, _, _ = run(tmp_path, "llava_instruct", llava_file(), "--image-root", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "entry 0" in proc.stderr and "missing" in proc.stderr


def test_llava_instruct_turns_out_of_order_are_skipped_and_counted_with_skip_bad(tmp_path):
    data = llava_file()
    data[1]["conversations"].reverse()
    proc, records, stats = run(tmp_path, "llava_instruct", data, "--skip-bad")
    assert proc.returncode == 0 and len(records) == 1 and stats["dropped"] == {"bad_entry": 1}


def test_llava_instruct_repeated_id_is_an_error_naming_both_entries(tmp_path):
    data = llava_file()
    data[1]["id"] = data[0]["id"]
    proc, _, _ = run(tmp_path, "llava_instruct", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "input.json" in proc.stderr and "'000000033471'" in proc.stderr
    assert "entry 0" in proc.stderr and "entry 1" in proc.stderr


def test_llava_instruct_turn_holding_bbox_is_an_error_naming_the_entry_and_turn(tmp_path):
    data = llava_file()
    data[1]["conversations"][1]["value"] = "The cat at <bbox> sleeps."
    proc, _, _ = run(tmp_path, "llava_instruct", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "input.json: entry 1 (id 000000052846): turn 1 value holds <bbox>" in proc.stderr
    assert "out.jsonl" not in proc.stderr


def test_every_converter_reports_truncated_json_in_one_line(tmp_path):
    for module in ("vg", "refcocog", "llava_instruct"):
        proc, _, _ = run(tmp_path, module, '[{"id": 1, "im')
        assert proc.returncode == 2, module
        assert proc.stderr.count("\n") == 1 and "input.json" in proc.stderr and "invalid JSON" in proc.stderr
