"""configs/pix2cap_sft.yaml is the Pix2Cap paper's recipe: GPT4RoI's stage-2 mixture plus Pix2Cap-COCO with
GPT4RoI's stage-2 hyper-parameters, and ``train_sft.py --check`` passes on hand-made files of every source."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gpt4roi_reference import write_tiny_gpt4roi
from test_convert_gpt4roi_sources import DETECTIONS, flickr_file, vcr_files
from test_convert_others import refcocog_file, vg_file
from test_convert_pix2cap import panoptic, seg

from gpt4roi_sft.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "pix2cap_sft.yaml"
SOURCES = ["pix2cap_coco_train", "refcocog_train", "flickr30k_train", "vg_train", "llava_instruct_150k_det",
           "vcr_full", "vcr_single", "vcr_multi"]


def test_recipe_is_gpt4roi_stage2_plus_pix2cap():
    cfg = load_config(str(RECIPE))
    assert [Path(p).stem for p, _ in cfg.data_sources()] == SOURCES
    assert all(ratio == 1.0 for _, ratio in cfg.data_sources())  # one pass over each file (ConcatDataset)
    t = cfg.train
    assert (t.num_epochs, t.learning_rate, t.weight_decay, t.lr_scheduler, t.warmup_steps) == (2, 2e-5, 0.0, "cosine", 3000)
    assert t.micro_batch_size * t.gradient_accumulation_steps * 8 == 16  # GPT4RoI: 8 GPUs x 2
    assert cfg.model.freeze == "stage2" and cfg.data.max_length == 2048 and not cfg.lora.enabled
    assert cfg.data.template == "gpt4roi_original" and t.precision == "bf16"


def _convert(module: str, *args) -> None:
    proc = subprocess.run([sys.executable, "-m", f"data_converters.{module}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _add_images(jsonl: Path, root: Path) -> None:
    """Blank pictures of the records' sizes wherever a record names an image not on disk."""
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        path = root / r["image"]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (r["width"] or 64, r["height"] or 64), (120, 130, 140)).save(path)


@pytest.fixture(scope="module")
def every_source(tmp_path_factory):
    """The eight training files of the recipe, converted from hand-made files in each source's format."""
    tmp = tmp_path_factory.mktemp("recipe")
    raw, images, jsonl = tmp / "raw", tmp / "images", tmp / "jsonl"
    images.mkdir()
    segments = [seg(1, [10, 10, 50, 60], "A man in a suit."),
                seg(2, [300, 100, 90, 80], "A tree by the road.", category_id=184)]
    pix = _write_json(raw / "pix2cap_coco_train.json", panoptic({9: segments}))
    _convert("pix2cap", "--annotations", pix, "--image-dir-prefix", "coco/train2017", "--min-square-box", 2,
             "--max-dialogues", 1, "--out", jsonl / "pix2cap_coco_train.jsonl")
    ref = _write_json(raw / "finetune_refcocog_train.json", refcocog_file())
    _convert("refcocog", "--annotations", ref, "--image-dir-prefix", "coco/train2014", "--min-words", 3,
             "--min-square-box", 2, "--out", jsonl / "refcocog_train.jsonl")
    fl = _write_json(raw / "final_flickr_mergedGT_train.json", flickr_file())
    _convert("flickr30k", "--annotations", fl, "--image-dir-prefix", "flickr30k-images", "--min-square-box", 2,
             "--out", jsonl / "flickr30k_train.jsonl")
    vg = _write_json(raw / "train.json", vg_file(20))
    _convert("vg", "--annotations", vg, "--image-dir-prefix", "vg", "--min-square-box", 2, "--max-dialogues", 1,
             "--out", jsonl / "vg_train.jsonl")
    llava_images = images / "coco" / "train2017"
    llava_images.mkdir(parents=True)
    for det in DETECTIONS:
        Image.new("RGB", (640, 480), (90, 120, 150)).save(llava_images / det["filename"])
    llava = _write_json(raw / "llava_instruct_150k.json", [
        {"id": str(k), "image": det["filename"],
         "conversations": [{"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Food."}]}
        for k, det in enumerate(DETECTIONS)])
    (raw / "det.pkl").write_bytes(pickle.dumps(DETECTIONS))
    _convert("llava_instruct", "--annotations", llava, "--detections", raw / "det.pkl", "--image-root", images,
             "--image-dir-prefix", "coco/train2017", "--out", jsonl / "llava_instruct_150k_det.jsonl")
    vcr = vcr_files(images)  # images/train.jsonl and images/vcr1images/... (metadata beside the pictures)
    for variant in ("full", "single", "multi"):
        _convert("vcr", "--annotations", vcr / "train.jsonl", "--image-root", images / "vcr1images", "--variant",
                 variant, "--image-dir-prefix", "vcr1images", "--out", jsonl / f"vcr_{variant}.jsonl")
    files = [jsonl / f"{name}.jsonl" for name in SOURCES]
    for f in files:
        assert f.read_text().strip(), f"{f.name} is empty"
        _add_images(f, images)
    return {"files": files, "images": images, "tmp": tmp}


@pytest.fixture(scope="module")
def released_model(tmp_path_factory):
    return write_tiny_gpt4roi(tmp_path_factory.mktemp("gpt4roi"), seed=0)


def _check(every_source, model, *overrides):
    train = ",".join(str(f) for f in every_source["files"])
    return subprocess.run([sys.executable, "train_sft.py", "--config", str(RECIPE), "--check", f"data.train={train}",
                           f"data.image_root={every_source['images']}", f"model.path={model}",
                           f"train.output_dir={every_source['tmp'] / 'run'}", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_recipe_check_passes_on_hand_made_files_of_every_source(every_source, released_model):
    proc = _check(every_source, released_model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = [line for line in proc.stdout.splitlines() if "training items with gpt4roi_original OK" in line]
    assert [Path(line.split(":")[0]).stem for line in ok] == SOURCES


def test_recipe_check_refuses_a_template_in_another_image_layout(every_source, released_model):
    proc = _check(every_source, released_model, "data.template=gpt4roi_v0")
    assert proc.returncode == 2 and "gpt4roi_original" in proc.stderr and "im_start_end" in proc.stderr


def test_recipe_check_names_a_missing_image(every_source, released_model, tmp_path):
    first = every_source["files"][0]
    record = json.loads(first.read_text().splitlines()[0])
    broken = tmp_path / first.name
    broken.write_text(json.dumps(dict(record, image="coco/train2017/missing.jpg")) + "\n")
    files = dict(every_source, files=[broken] + every_source["files"][1:])
    proc = _check(files, released_model)
    assert proc.returncode == 2 and "missing.jpg" in proc.stderr and f"{broken} line 1" in proc.stderr


@pytest.mark.slow
def test_recipe_trains_from_the_released_layout_on_every_source(every_source, released_model):
    import os

    out = every_source["tmp"] / "train"
    train = ",".join(str(f) for f in every_source["files"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train_sft.py", "--config", str(RECIPE), f"data.train={train}",
                           f"data.image_root={every_source['images']}", f"model.path={released_model}",
                           f"train.output_dir={out}", "train.max_steps=2", "train.micro_batch_size=2",
                           "train.precision=fp32", "train.warmup_steps=0", "model.gradient_checkpointing=false",
                           "deepspeed.config=ds_configs/zero2.json", "train.save_steps=2", "train.tensorboard=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 2
    assert all(r["loss"] == r["loss"] and r["loss"] < 100 for r in log if "loss" in r)
