"""GPT4RoI's stage-2 sources that Pix2Cap adds to: Flickr30k Entities (MDETR), VCR (three variants) and
LLaVA-Instruct-150K with GPT4RoI's EVA-02 LVIS detections, converted from hand-made files in their real formats."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import run_converter
from data_converters.templates import FLICKR_ALL_REGIONS, FLICKR_ONE_REGION, VCR_REFERENCE, VCR_WHY
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE

REPO = Path(__file__).resolve().parents[1]
CAPTION = "Two young guys with shaggy hair look at their hands while hanging out in the yard ."


# ------------------------------------------------------------------------------------------- Flickr30k
def flickr_file() -> dict:
    """MDETR's final_flickr_mergedGT layout: one image entry per caption, boxes with caption spans."""
    return {"images": [{"file_name": "1000092795.jpg", "height": 500, "width": 333, "id": 0, "caption": CAPTION,
                        "dataset_name": "flickr", "sentence_id": 0, "original_img_id": 1000092795,
                        "tokens_negative": [[0, 3]], "tokens_positive_eval": [[[0, 20]]]},
                       {"file_name": "10002456.jpg", "height": 400, "width": 400, "id": 1,
                        "caption": "A dog .", "dataset_name": "flickr", "sentence_id": 0, "original_img_id": 10002456}],
            "annotations": [{"area": 7504, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0,
                             "bbox": [4, 45, 46, 163], "tokens_positive": [[0, 20]]},
                            {"area": 6000, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 1,
                             "bbox": [120, 60, 50, 120], "tokens_positive": [[0, 20]]},
                            {"area": 900, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 2,
                             "bbox": [100, 300, 30, 30], "tokens_positive": [[40, 51], [58, 62]]},
                            {"area": 4, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 3,
                             "bbox": [10, 10, 2, 2], "tokens_positive": [[2, 5]]}],
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}


def test_flickr_lists_every_box_then_asks_for_each_phrase(tmp_path):
    proc, records, _ = run_converter(tmp_path, "flickr30k", flickr_file(), "--image-dir-prefix", "flickr30k-images")
    assert proc.returncode == 0, proc.stderr
    record = next(r for r in records if r["image"] == "flickr30k-images/1000092795.jpg")
    turns = [t["value"] for t in record["conversations"]]
    listed = "region1 <bbox>,region2 <bbox>,region3 <bbox>,"
    assert any(turns[0] == GPT4ROI_PREAMBLE + q.replace("<spi_descript>", listed) for q in FLICKR_ALL_REGIONS)
    assert turns[1] == CAPTION
    phrase_of_box = {(4.0, 45.0): "Two young guys with ", (120.0, 60.0): "Two young guys with ",
                     (100.0, 300.0): "their hands"}
    for i, region in enumerate(record["regions"], start=1):
        assert any(turns[2 * i] == q.replace("<spi_descript>", f"region {i}") for q in FLICKR_ONE_REGION)
        assert turns[2 * i + 1] == phrase_of_box[tuple(region["bbox"][:2])]  # the box's first span


def test_flickr_drops_boxes_gpt4roi_filters_at_224_px_and_entries_left_empty(tmp_path):
    proc, records, stats = run_converter(tmp_path, "flickr30k", flickr_file(), "--min-square-box", "2")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in records] == ["flickr30k/input/0"]  # the dog's 2x2 box is 1.1 px at 224
    assert stats["dropped"] == {"small_in_224_square": 1} and stats["images_without_regions"] == 1


def test_flickr_record_check_error_names_the_input_file_and_record_not_the_output(tmp_path):
    data = flickr_file()
    data["images"][0]["caption"] = CAPTION + " <bbox>"
    proc, _, _ = run_converter(tmp_path, "flickr30k", data)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "error: input.json: record flickr30k/input/0 (out.jsonl: record 1)" in proc.stderr


def test_flickr_span_outside_the_caption_is_an_error_naming_the_annotation(tmp_path):
    data = flickr_file()
    data["annotations"][0]["tokens_positive"] = [[70, 500]]
    proc, _, _ = run_converter(tmp_path, "flickr30k", data)
    assert proc.returncode == 2 and "image 0 annotation 0" in proc.stderr and "tokens_positive" in proc.stderr


# ------------------------------------------------------------------------------------------------- VCR
VCR_LINES = [
    {"objects": ["person", "person", "dog"], "question_orig": "Why is 2 looking at 1 ?",
     "answer_orig": "2 wants 1 to share .", "rationale_orig": "1 is holding food near 2 ."},
    {"objects": ["person", "dog", "car"], "question_orig": "Is 1 happy ?", "answer_orig": "Yes , 1 is smiling .",
     "rationale_orig": "1 has a wide grin ."},
    {"objects": ["person", "person", "dog"], "question_orig": "What is 3 doing ?", "answer_orig": "3 is sleeping .",
     "rationale_orig": "3 lies still ."},
    {"objects": ["person", "person"], "question_orig": "Does 1 know 1 ?", "answer_orig": "1 does .",
     "rationale_orig": "1 waves ."},
    {"objects": ["person", "person", "dog"], "question_orig": "Is 1 the 2nd one ?", "answer_orig": "1 is .",
     "rationale_orig": "1 stands ."},
]
BOXES = [[10.0, 20.0, 110.0, 220.0, 0.99], [200.0, 30.0, 300.0, 240.0, 0.98], [400.0, 300.0, 500.0, 380.0, 0.9]]


def vcr_files(root: Path) -> Path:
    images = root / "vcr1images" / "movie_a"
    images.mkdir(parents=True)
    lines = []
    for k, line in enumerate(VCR_LINES):
        meta = {"boxes": BOXES[: len(line["objects"])], "segms": [], "names": line["objects"], "width": 640,
                "height": 480}
        (images / f"{k}.json").write_text(json.dumps(meta))
        lines.append(json.dumps({"movie": "movie_a", "img_fn": f"movie_a/{k}.jpg", "metadata_fn": f"movie_a/{k}.json",
                                 "annot_id": f"train-{k}", "question": [], "answer_choices": [], "answer_label": 0,
                                 **line}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run_vcr(tmp_path, *args):
    root = vcr_files(tmp_path / "vcr")
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", "data_converters.vcr", "--annotations", str(root / "train.jsonl"),
                           "--image-root", str(root / "vcr1images"), "--out", str(out), "--stats", str(stats), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    records = [json.loads(x) for x in out.read_text().splitlines()] if proc.returncode == 0 else None
    return proc, records, (json.loads(stats.read_text()) if stats.exists() else None)


def test_vcr_full_lists_every_object_and_names_numbers_as_gpt4roi_did(tmp_path):
    proc, records, stats = run_vcr(tmp_path, "--variant", "full")
    assert proc.returncode == 0, proc.stderr
    first = records[0]
    human, answer, why_q, why = (t["value"] for t in first["conversations"])
    listed = "region1 <bbox>,region2 <bbox>,region3 <bbox>"
    prefixes = [GPT4ROI_PREAMBLE + p.replace("<spi>", listed) for p in VCR_REFERENCE]
    # GPT4RoI names number N by objects[N]: 2 -> "dog", 1 -> "person" (the second person)
    assert human in [p + "Why is dog at region2 looking at person at region1 ?" for p in prefixes]
    assert answer == "dog at region2 wants person at region1 to share ."
    assert why_q in VCR_WHY and why == "person at region1 is holding food near dog at region2 ."
    assert [r["bbox"] for r in first["regions"]] == [b[:4] for b in BOXES]
    assert stats["dropped"] == {"number_not_an_object": 1}  # "3" of a 3-object line names objects[3]
    assert len(records) == 4


def test_vcr_full_one_based_names_correct_the_offset(tmp_path):
    _, records, _ = run_vcr(tmp_path, "--variant", "full", "--one-based-names")
    assert records[0]["conversations"][1]["value"] == "person at region2 wants person at region1 to share ."
    assert len(records) == 5


def test_vcr_single_keeps_one_object_questions_with_that_box_only(tmp_path):
    proc, records, stats = run_vcr(tmp_path, "--variant", "single")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in records] == ["vcr/single/2", "vcr/single/3"]
    happy = records[0]
    assert [t["value"] for t in happy["conversations"]][::2] == [
        GPT4ROI_PREAMBLE + "Is region1 <bbox> happy ?", happy["conversations"][2]["value"]]
    assert happy["conversations"][1]["value"] == "Yes , person at region1 is smiling ."
    assert happy["conversations"][3]["value"] == "person at region1 has a wide grin ."
    assert [r["bbox"] for r in happy["regions"]] == [BOXES[0][:4]]
    assert stats["dropped"] == {"several_objects": 3}


def test_vcr_multi_numbers_regions_in_question_order_as_gpt4roi_did(tmp_path):
    proc, records, stats = run_vcr(tmp_path, "--variant", "multi")
    assert proc.returncode == 0, proc.stderr
    looking, knowing = records
    values = [t["value"] for t in looking["conversations"]]
    assert values[0] == GPT4ROI_PREAMBLE + "Why is region1 <bbox> looking at region2 <bbox> ?"
    assert values[1] == "person at region1 wants person at region2 to share ."
    assert values[3] == "person at region2 is holding food near person at region1 ."
    assert [r["bbox"] for r in looking["regions"]] == [BOXES[1][:4], BOXES[0][:4]]
    # a repeated number keeps region1 and lists its box twice; "2nd" leaves a box without <bbox>: dropped
    assert knowing["conversations"][0]["value"] == GPT4ROI_PREAMBLE + "Does region1 <bbox> know region1 <bbox> ?"
    assert [r["bbox"] for r in knowing["regions"]] == [BOXES[0][:4], BOXES[0][:4]]
    assert stats["dropped"] == {"one_object": 2, "box_count_mismatch": 1}


def test_vcr_missing_metadata_is_an_error_naming_the_line(tmp_path):
    root = vcr_files(tmp_path / "vcr")
    (root / "vcr1images" / "movie_a" / "1.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "data_converters.vcr", "--annotations", str(root / "train.jsonl"),
                           "--image-root", str(root / "vcr1images"), "--out", str(tmp_path / "o.jsonl")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "1.json" in proc.stderr


# ------------------------------------------------------------------------------ LLaVA + detections
def llava_files(root: Path, detections) -> tuple[Path, Path]:
    (root / "coco").mkdir(parents=True)
    for name, size in (("000000000001.jpg", (640, 480)), ("000000000002.jpg", (320, 320))):
        Image.new("RGB", size, (90, 120, 150)).save(root / "coco" / name)
    data = [{"id": "1", "image": "000000000001.jpg",
             "conversations": [{"from": "human", "value": "What is on the table?\n<image>"},
                               {"from": "gpt", "value": "A bagel and a cup."}]},
            {"id": "2", "image": "000000000002.jpg",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                               {"from": "gpt", "value": "A car on a road."}]}]
    (root / "llava_instruct_150k.json").write_text(json.dumps(data))
    (root / "det.pkl").write_bytes(pickle.dumps(detections))
    return root / "llava_instruct_150k.json", root / "det.pkl"


BAGEL, CUP, SHAVING_CREAM = 36, 343, 939  # LVIS v1 0-based labels
DETECTIONS = [
    {"filename": "000000000001.jpg",
     "pred_bboxes": np.array([[0.1, 0.1, 0.5, 0.6, 0.9], [0.5, 0.5, 0.9, 0.9, 0.2],       # low score: dropped
                              [0.6, 0.1, 0.61, 0.5, 0.8], [0.2, 0.2, 0.4, 0.5, 0.7]]),     # 1% wide: dropped
     "labels": np.array([BAGEL, CUP, CUP, SHAVING_CREAM])},
    {"filename": "000000000002.jpg", "pred_bboxes": np.array([[0.0, 0.0, 0.5, 0.5, 0.1], [0.5, 0.5, 1.0, 1.0, 0.2]]),
     "labels": np.array([CUP, BAGEL])},  # nothing passes: the first 10 as they are
]


def run_llava(tmp_path, detections, *args):
    ann, pkl = llava_files(tmp_path / "llava", detections)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "data_converters.llava_instruct", "--annotations", str(ann),
                           "--image-root", str(tmp_path / "llava" / "coco"), "--detections", str(pkl),
                           "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, ([json.loads(x) for x in out.read_text().splitlines()] if proc.returncode == 0 else None)


def test_llava_detections_become_gpt4roi_regional_preamble_in_place(tmp_path):
    proc, records = run_llava(tmp_path, DETECTIONS, "--box-probability", "1")
    assert proc.returncode == 0, proc.stderr
    first, second = records
    assert first["conversations"][0]["value"] == (
        "What is on the table?\nThe <image> provides an overview of the picture. Here is also some regional "
        "information about the image, such as <bbox> may feature a bagel,<bbox> may feature a shawl,.\n")
    assert first["regions"] == [{"bbox": [64.0, 48.0, 320.0, 288.0]}, {"bbox": [128.0, 96.0, 256.0, 240.0]}]
    assert first["conversations"][0]["value"].count("<bbox>") == 2 and first["source"] == "llava_instruct_150k_det"
    assert second["conversations"][0]["value"].count("<bbox>") == 2  # fallback: the unfiltered first boxes


def test_llava_detections_exact_lvis_names_on_request(tmp_path):
    _, records = run_llava(tmp_path, DETECTIONS, "--box-probability", "1", "--lvis-names", "exact")
    assert "<bbox> may feature a shaving_cream," in records[0]["conversations"][0]["value"]


def test_llava_without_the_boxes_coin_gets_the_plain_preamble(tmp_path):
    _, records = run_llava(tmp_path, DETECTIONS, "--box-probability", "0")
    assert records[1]["conversations"][0]["value"] == (
        "The <image> provides an overview of the picture. \n\nDescribe the picture.")
    assert all(r["regions"] == [] for r in records)


def test_llava_detection_pickle_with_other_objects_is_refused(tmp_path):
    from fractions import Fraction

    proc, _ = run_llava(tmp_path, [{"filename": "x.jpg", "pred_bboxes": Fraction(1, 2), "labels": []}])
    assert proc.returncode == 2 and "only numpy arrays" in proc.stderr and "det.pkl" in proc.stderr
