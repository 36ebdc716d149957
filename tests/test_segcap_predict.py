"""eval.segcap_predict: our captioner on given panoptic segments or on Mask2Former's, in Pix2Cap's prediction format."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from data_converters.synthetic import decode_panoptic
from eval import segcap, segcap_predict
from eval.prediction_store import PredictionStore
from gpt4roi_sft.errors import ConfigError


class RecordingCaptioner:
    """Stands in for the model: echoes a numbered caption; can die after some batches; may want masks."""

    def __init__(self, die_after_batches=None, needs_masks=False):
        self.asked = []
        self.batches = 0
        self.die_after_batches = die_after_batches
        self.needs_masks = needs_masks

    def __call__(self, requests):
        if self.die_after_batches is not None and self.batches >= self.die_after_batches:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.asked.extend(requests)
        return [f"a red circle number {len(self.asked) - len(requests) + k}" for k in range(len(requests))]


def gt_of(root):
    return json.loads((root / "annotations" / "pix2cap_coco_val.json").read_text())


def config(root, out, **kw):
    return segcap_predict.SegCapRunConfig(data=root, out=out, batch_size=3, evaluate=False, **kw)


def test_given_segments_are_each_captioned_once_in_pix2cap_format(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    captioner = RecordingCaptioner()
    segcap_predict.run(config(root, tmp_path), captioner=captioner)
    pred = json.loads((tmp_path / "predictions.json").read_text())
    gt = gt_of(root)
    n_segments = sum(len(a["segments_info"]) for a in gt["annotations"])
    assert len(captioner.asked) == n_segments and captioner.batches == -(-n_segments // 3)
    for g, p in zip(gt["annotations"], pred["annotations"]):
        assert [s["id"] for s in p["segments_info"]] == [s["id"] for s in g["segments_info"]]
        assert all(s["caption"].startswith("a red circle") for s in p["segments_info"])
        ids = decode_panoptic(np.asarray(Image.open(tmp_path / "panoptic_pred" / p["file_name"]).convert("RGB")))
        assert {s["id"]: int((ids == s["id"]).sum()) for s in p["segments_info"]} == {s["id"]: s["area"] for s in g["segments_info"]}


def test_each_request_is_one_region_with_the_segments_box(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    captioner = RecordingCaptioner()
    segcap_predict.run(config(root, tmp_path, max_images=1), captioner=captioner)
    first = gt_of(root)["annotations"][0]["segments_info"]
    for request, seg in zip(captioner.asked, first):
        x, y, w, h = seg["bbox"]
        assert request.boxes == [[x, y, x + w, y + h]]
        assert request.prompt.count("<bbox>") == 1 and request.prompt.count("<image>") == 1
        assert request.masks is None  # box models get no masks


def test_mask_aware_captioner_gets_each_segments_mask(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    captioner = RecordingCaptioner(needs_masks=True)
    segcap_predict.run(config(root, tmp_path, max_images=1), captioner=captioner)
    ann = gt_of(root)["annotations"][0]
    ids = decode_panoptic(np.asarray(Image.open(root / "panoptic_val2017" / ann["file_name"]).convert("RGB")))
    for request, seg in zip(captioner.asked, ann["segments_info"]):
        (mask,) = request.masks
        assert np.array_equal(mask, ids == seg["id"])


def test_killed_run_resumes_and_each_segment_is_captioned_once(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    with pytest.raises(KeyboardInterrupt):
        segcap_predict.run(config(root, tmp_path), captioner=RecordingCaptioner(die_after_batches=2))
    assert len(PredictionStore(tmp_path / segcap_predict.CAPTIONS_STORE)) == 6
    second = RecordingCaptioner()
    segcap_predict.run(config(root, tmp_path), captioner=second)
    n_segments = sum(len(a["segments_info"]) for a in gt_of(root)["annotations"])
    assert len(second.asked) == n_segments - 6


def test_user_given_segments_are_captioned_instead_of_the_ground_truth(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    gt = gt_of(root)
    mine = {"annotations": [{**a, "segments_info": a["segments_info"][:1]} for a in gt["annotations"]]}
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    captioner = RecordingCaptioner()
    segcap_predict.run(config(root, tmp_path / "out", segments_json=tmp_path / "mine.json",
                              segments_dir=root / "panoptic_val2017"), captioner=captioner)
    assert len(captioner.asked) == len(gt["annotations"])
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    ann = pred["annotations"][0]
    ids = decode_panoptic(np.asarray(Image.open(tmp_path / "out" / "panoptic_pred" / ann["file_name"]).convert("RGB")))
    assert set(np.unique(ids).tolist()) == {0, ann["segments_info"][0]["id"]}  # unlisted segments are VOID


def test_max_images_scores_against_that_subset_of_the_ground_truth(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]

    class Truthful(RecordingCaptioner):  # captions each segment with its own description
        def __init__(self):
            super().__init__()
            self.by_box = {}
            for a in gt_of(root)["annotations"]:
                for s in a["segments_info"]:
                    x, y, w, h = s["bbox"]
                    self.by_box[(a["image_id"], x, y, x + w, y + h)] = s["description"]

        def __call__(self, requests):
            super().__call__(requests)
            return [self.by_box[(int(os.path.basename(str(r.image)).split(".")[0]), *map(int, r.boxes[0]))]
                    for r in requests]

    cfg = config(root, tmp_path, max_images=2)
    cfg.evaluate = True
    metrics = segcap_predict.run(cfg, captioner=Truthful())
    assert metrics["images"] == 2 and metrics["PQ"] == 1.0 and metrics["FP"] == metrics["FN"] == 0
    assert metrics["BLEU-4"] == pytest.approx(1.0) and metrics["CIDEr"] > 5


# ---------------------------------------------------------------- the two-stage track (transformers' Mask2Former)


def tiny_mask2former(out_dir, names):
    """A random Mask2Former (tiny Swin backbone) with ``names`` as its labels, saved with its image processor."""
    pytest.importorskip("scipy")  # transformers' Mask2Former builds its loss (scipy) even for inference
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=8, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(out_dir)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32).save_pretrained(out_dir)
    return out_dir


LOOSE = segcap_predict.SegmenterSettings(threshold=0.0, mask_threshold=0.05, overlap_threshold=0.0)


def test_segmenter_labels_map_to_categories_by_name_and_unknown_labels_become_void(synthetic_pix2cap, tmp_path):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    path = tiny_mask2former(tmp_path / "m2f", ["Circle", "sky", "zebra"])
    cats = {c["id"]: c for c in gt_of(synthetic_pix2cap["root"])["categories"]}
    seg = segcap_predict.PanopticSegmenter(Mask2FormerForUniversalSegmentation.from_pretrained(path),
                                           AutoImageProcessor.from_pretrained(path), cats, LOOSE)
    assert seg.label_to_category == {0: 1, 1: 101} and seg.stuff_labels == {1}
    segmentation = torch.tensor([[1, 1, 2, 2], [3, 3, 0, 0]])
    info = [{"id": 1, "label_id": 1, "score": 0.5}, {"id": 1, "label_id": 1, "score": 0.7},  # fused stuff repeats
            {"id": 2, "label_id": 0, "score": 0.9}, {"id": 3, "label_id": 2, "score": 0.9}]  # 2: zebra
    ids, segments = seg.to_panoptic(segmentation, info)
    assert ids.tolist() == [[1, 1, 2, 2], [0, 0, 0, 0]]
    assert segments == [{"id": 1, "category_id": 101, "score": 0.7}, {"id": 2, "category_id": 1, "score": 0.9}]


def test_segmenter_with_no_known_label_is_a_config_error(synthetic_pix2cap, tmp_path):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    path = tiny_mask2former(tmp_path / "m2f", ["zebra", "giraffe"])
    cats = {c["id"]: c for c in gt_of(synthetic_pix2cap["root"])["categories"]}
    with pytest.raises(ConfigError, match="match no ground-truth category"):
        segcap_predict.PanopticSegmenter(Mask2FormerForUniversalSegmentation.from_pretrained(path),
                                         AutoImageProcessor.from_pretrained(path), cats, LOOSE)


def test_segmenter_crops_each_images_padding_before_post_processing(synthetic_pix2cap):
    pytest.importorskip("scipy")
    from transformers import Mask2FormerImageProcessor
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    class PaddingAwareModel(torch.nn.Module):
        """Query 0 says 'circle' over each image's real pixels, query 1 'sky' over the batch padding."""

        config = type("Config", (), {"id2label": {0: "circle", 1: "sky"}})()

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values, pixel_mask):
            b, _, h, w = pixel_values.shape
            real = pixel_mask[:, ::4, ::4].bool()
            masks = torch.stack([torch.where(real, 10.0, -10.0), torch.where(real, -10.0, 10.0)], dim=1)
            classes = torch.tensor([[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0]]).expand(b, 2, 3)
            return Mask2FormerForUniversalSegmentationOutput(class_queries_logits=classes, masks_queries_logits=masks)

    cats = {c["id"]: c for c in gt_of(synthetic_pix2cap["root"])["categories"]}
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32)
    seg = segcap_predict.PanopticSegmenter(PaddingAwareModel(), processor, cats, segcap_predict.SegmenterSettings())
    images = [Image.new("RGB", (160, 120)), Image.new("RGB", (90, 200))]  # very different padding in one batch
    for (ids, segments), im in zip(seg(images), images):
        assert ids.shape == (im.height, im.width)
        assert segments == [{"id": 1, "category_id": 1, "score": pytest.approx(1.0, abs=1e-6)}]
        assert (ids == 1).all()  # no band of the image comes from the batch's padding


def test_two_stage_script_runs_segmenter_captioner_and_evaluator_then_resumes(synthetic_pix2cap, tiny_model_dir, tmp_path):
    root = synthetic_pix2cap["root"]
    path = tiny_mask2former(tmp_path / "m2f", [c["name"] for c in gt_of(root)["categories"]])
    env = {**os.environ, "GPT4ROI_VENV": sys.prefix, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    cmd = ["bash", str(REPO / "scripts" / "eval_segcap.sh"), "--data", str(root), "--out", str(tmp_path / "out"),
           "--segmenter", str(path), "--segmenter-threshold", "0", "--mask-threshold", "0.05", "--overlap-threshold", "0",
           "--max-images", "3", "--max-new-tokens", "4", "--workers", "1"]
    proc = subprocess.run(cmd + ["--model", tiny_model_dir], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["TP"] + metrics["FP"] + metrics["FN"] > 0
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sum(len(a["segments_info"]) for a in pred["annotations"]) > 0
    assert "Panoptic segmentation-captioning" in proc.stdout
    # A rerun finds everything done: neither model is loaded again (a missing --model would otherwise fail).
    rerun = subprocess.run(cmd + ["--model", str(tmp_path / "no_such_model")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["PQ"] == metrics["PQ"]


# ---------------------------------------------------------------- the real captioner, box and mask modes


@pytest.mark.parametrize("region_mode", ["box", "mask"])
def test_region_captioner_captions_segments_in_box_and_mask_mode(synthetic_pix2cap, tmp_path, region_mode):
    from gpt4roi_sft.infer import DecodeSettings, load_captioner
    from quickstart.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=0, region_mode=region_mode)
    captioner = load_captioner(model_dir, settings=DecodeSettings(max_new_tokens=3), device="cpu")
    assert captioner.needs_masks == (region_mode == "mask")
    root = synthetic_pix2cap["root"]
    segcap_predict.run(config(root, tmp_path / "out", max_images=1), captioner=captioner)
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert all(isinstance(s["caption"], str) for s in pred["annotations"][0]["segments_info"])


def test_mask_mode_captioner_without_masks_names_the_request():
    from gpt4roi_sft.infer import RegionCaptioner, RegionRequest

    class Model:
        class config:
            region_mode = "mask"

    captioner = RegionCaptioner(Model(), processor=None)
    with pytest.raises(ValueError, match="request 0: .*needs one mask per box"):
        captioner([RegionRequest(Image.new("RGB", (8, 8)), "<image> region1 <bbox>", [[0, 0, 4, 4]])])


def test_evaluate_given_segments_returns_the_metrics(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    metrics = segcap.evaluate_given_segments(None, root, tmp_path, max_images=1, captioner=RecordingCaptioner())
    assert metrics["PQ"] == 1.0 and metrics["images"] == 1 and all(k in metrics for k in segcap.CAPTION_KEYS)
    assert json.loads((tmp_path / "metrics.json").read_text())["TP"] == metrics["TP"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_stage_on_cuda_with_a_mask_aware_model(synthetic_pix2cap, tmp_path):
    from quickstart.tiny_model import build_tiny_model

    root = synthetic_pix2cap["root"]
    model_dir = build_tiny_model(tmp_path / "model", seed=0, region_mode="box+mask")
    path = tiny_mask2former(tmp_path / "m2f", [c["name"] for c in gt_of(root)["categories"]])
    cfg = config(root, tmp_path / "out", model=model_dir, segmenter=path, max_images=2, segmenter_settings=LOOSE)
    segcap_predict.run(cfg)  # both models load onto the GPU (no Java there: evaluate=False)
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sum(len(a["segments_info"]) for a in pred["annotations"]) > 0
    assert all(isinstance(s["caption"], str) for a in pred["annotations"] for s in a["segments_info"])
