"""Specification of the synthetic Pix2Cap-COCO generator."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_converters.synthetic import COLOURS, KINDS, SIZES, caption_corpus, decode_panoptic, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, train_images=6, val_images=3, seed=7)
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_files(dataset, tmp_path):
    generate(tmp_path, train_images=6, val_images=3, seed=7)
    assert _digest(tmp_path) == _digest(dataset)


def test_different_seed_writes_different_annotations(dataset, tmp_path):
    generate(tmp_path, train_images=6, val_images=3, seed=8)
    assert _digest(tmp_path)["annotations/pix2cap_coco_train.json"] != _digest(dataset)["annotations/pix2cap_coco_train.json"]


def test_layout_matches_coco_panoptic(dataset):
    for split in ("train", "val"):
        data = _load(dataset / "annotations" / f"pix2cap_coco_{split}.json")
        assert {"images", "annotations", "categories"} <= set(data)
        for img, ann in zip(data["images"], data["annotations"]):
            assert img["file_name"] == f"{img['id']:012d}.jpg"
            assert ann["file_name"] == f"{img['id']:012d}.png"
            with Image.open(dataset / f"{split}2017" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
            assert (dataset / f"panoptic_{split}2017" / ann["file_name"]).is_file()


def test_image_sizes_vary_and_are_not_square(dataset):
    images = _load(dataset / "annotations" / "pix2cap_coco_train.json")["images"]
    assert len({(i["width"], i["height"]) for i in images}) > 1
    assert any(i["width"] != i["height"] for i in images)


def test_panoptic_png_ids_match_segments_info(dataset):
    data = _load(dataset / "annotations" / "pix2cap_coco_train.json")
    for ann in data["annotations"]:
        ids = decode_panoptic(np.asarray(Image.open(dataset / "panoptic_train2017" / ann["file_name"])))
        assert set(np.unique(ids).tolist()) == {s["id"] for s in ann["segments_info"]}
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            assert int(mask.sum()) == seg["area"]
            ys, xs = np.nonzero(mask)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_thing_boxes_mostly_show_their_own_colour(dataset):
    data = _load(dataset / "annotations" / "pix2cap_coco_train.json")
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    for img, ann in zip(data["images"], data["annotations"]):
        rgb = np.asarray(Image.open(dataset / "train2017" / img["file_name"])).astype(int)
        for seg in ann["segments_info"]:
            if seg["category_id"] in things:
                x, y, w, h = seg["bbox"]
                crop = rgb[y:y + h, x:x + w]
                near = np.abs(crop - np.array(COLOURS[seg["attributes"]["colour"]])).sum(-1) < 60
                assert near.mean() > 0.4


def test_thing_descriptions_name_colour_kind_and_size(dataset):
    data = _load(dataset / "annotations" / "pix2cap_coco_train.json")
    things = {c["id"]: c["name"] for c in data["categories"] if c["isthing"]}
    n = 0
    for ann in data["annotations"]:
        for seg in ann["segments_info"]:
            if seg["category_id"] in things:
                attrs, words = seg["attributes"], seg["description"].replace(",", " ").replace(".", " ").split()
                assert attrs["kind"] == things[seg["category_id"]]
                assert {attrs["colour"], attrs["kind"], attrs["size"]} <= set(words)
                assert 15 <= len(words) <= 30
                n += 1
    assert n > 0


def test_every_image_has_two_stuff_bands_and_two_or_three_things(dataset):
    data = _load(dataset / "annotations" / "pix2cap_coco_train.json")
    isthing = {c["id"]: c["isthing"] for c in data["categories"]}
    for ann in data["annotations"]:
        flags = [isthing[s["category_id"]] for s in ann["segments_info"]]
        assert flags.count(0) == 2 and 2 <= flags.count(1) <= 3


def test_vg_test_file_holds_one_val_thing_per_sample(dataset):
    test = _load(dataset / "annotations" / "test_caption.json")
    val = _load(dataset / "annotations" / "pix2cap_coco_val.json")
    isthing = {c["id"]: c["isthing"] for c in val["categories"]}
    n_things = sum(isthing[s["category_id"]] for a in val["annotations"] for s in a["segments_info"])
    assert len(test["images"]) == len(test["annotations"]) == n_things
    for img, ann in zip(test["images"], test["annotations"]):
        assert ann["id"] == ann["image_id"] == img["id"]
        assert img["file_name"].startswith("val2017/") and (dataset / img["file_name"]).is_file()
        assert len(ann["bbox"]) == 4 and ann["caption"] and ann["attributes"]["colour"] in COLOURS


def test_caption_corpus_covers_every_description_word(dataset):
    vocab = set(" ".join(caption_corpus()).split())
    assert set(COLOURS) | set(KINDS) | set(SIZES) <= vocab
    for split in ("train", "val"):
        for ann in _load(dataset / "annotations" / f"pix2cap_coco_{split}.json")["annotations"]:
            for seg in ann["segments_info"]:
                assert set(seg["description"].split()) <= vocab, seg["description"]


def test_cli_writes_dataset_and_reports_speed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_converters.synthetic", "--out", str(tmp_path),
                           "--train-images", "20", "--val-images", "4", "--seed", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout
    assert len(list((tmp_path / "train2017").glob("*.jpg"))) == 20
    assert len(list((tmp_path / "panoptic_val2017").glob("*.png"))) == 4
