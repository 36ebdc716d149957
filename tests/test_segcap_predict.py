"""eval.segcap_predict: our captioner on given panoptic segments or on Mask2Former's, in Pix2Cap's prediction format."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from data_converters.synthetic import decode_panoptic
from eval import segcap, segcap_predict
from eval.prediction_store import PredictionStore
from gpt4roi_sft.errors import ConfigError, DataError


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
    # A rerun finds everything done: nothing is segmented or captioned again.
    rerun = subprocess.run(cmd + ["--model", tiny_model_dir], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "segmenting" not in rerun.stderr and "captioning segments" not in rerun.stderr
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
    metrics = segcap_predict.evaluate_given_segments(None, root, tmp_path, max_images=1, captioner=RecordingCaptioner())
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


# ---------------------------------------------------------------- results tied to what produced them (eval.harness)


class WholeImageSegmenter:
    """Stands in for Mask2Former: one 'sky' segment over each whole image; counts the images it sees."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return [(np.ones((im.height, im.width), dtype=np.int64), [{"id": 1, "category_id": 101, "score": 0.9}])
                for im in images]


def n_segments(root):
    return sum(len(a["segments_info"]) for a in gt_of(root)["annotations"])


def test_resuming_with_another_model_is_refused_in_one_line_naming_the_model(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    cfg = config(root, tmp_path / "out", model=fake_model(tmp_path / "m1", 0.0))
    segcap_predict.run(cfg, captioner=RecordingCaptioner())
    cfg.model = fake_model(tmp_path / "m2", 1.0)
    with pytest.raises(DataError, match=r"captions.partial.jsonl: written by another setup \(changed model: ") as err:
        segcap_predict.run(cfg, captioner=RecordingCaptioner())
    assert "\n" not in str(err.value)


def test_overwrite_captions_every_segment_again_for_another_model(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    cfg = config(root, tmp_path / "out", model=fake_model(tmp_path / "m1", 0.0))
    segcap_predict.run(cfg, captioner=RecordingCaptioner())
    cfg.model, cfg.overwrite = fake_model(tmp_path / "m2", 1.0), True
    again = RecordingCaptioner()
    segcap_predict.run(cfg, captioner=again)
    assert len(again.asked) == n_segments(root)


def test_same_model_resumes_with_nothing_to_caption(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    cfg = config(root, tmp_path / "out", model=fake_model(tmp_path / "m1", 0.0))
    segcap_predict.run(cfg, captioner=RecordingCaptioner())
    again = RecordingCaptioner()
    segcap_predict.run(cfg, captioner=again)
    assert again.asked == []


def cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "eval.segcap_predict", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_missing_model_is_refused_even_when_every_caption_is_stored(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    segcap_predict.run(config(root, tmp_path / "out", model=fake_model(tmp_path / "m1")), captioner=RecordingCaptioner())
    for model, error in (([], "--model is required"), (["--model", tmp_path / "gone"], "gone: directory not found")):
        proc = cli("--data", root, "--out", tmp_path / "out", "--no-eval", *model)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = proc.stderr.strip().splitlines()
        assert error in line


def test_score_only_writes_the_prediction_from_stored_captions_without_a_model(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    segcap_predict.run(config(root, tmp_path / "out"), captioner=RecordingCaptioner())
    (tmp_path / "out" / "predictions.json").unlink()
    proc = cli("--data", root, "--out", tmp_path / "out", "--no-eval", "--score-only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sum(len(a["segments_info"]) for a in pred["annotations"]) == n_segments(root)


def test_two_shards_merge_into_the_prediction_of_one_process(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    segcap_predict.run(config(root, tmp_path / "one"), captioner=RecordingCaptioner())
    asked = 0
    for i in range(2):
        captioner = RecordingCaptioner()
        assert segcap_predict.run(config(root, tmp_path / "two", shard_id=i, num_shards=2), captioner=captioner) is None
        asked += len(captioner.asked)
    assert asked == n_segments(root) and not (tmp_path / "two" / "predictions.json").exists()
    assert segcap_predict.main(["merge", "--data", str(root), "--out", str(tmp_path / "two"), "--num-shards", "2",
                                "--no-eval"]) == 0
    one, two = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("one", "two"))
    ids = lambda pred: [[s["id"] for s in a["segments_info"]] for a in pred["annotations"]]  # noqa: E731
    assert ids(two) == ids(one)


def test_batches_follow_the_captioners_plan(synthetic_pix2cap, tmp_path):
    class Planner(RecordingCaptioner):
        def plan(self, requests, batch_size):  # last request first, two per batch
            order = list(range(len(requests)))[::-1]
            return [order[i:i + 2] for i in range(0, len(order), 2)]

    root = synthetic_pix2cap["root"]
    captioner = Planner()
    segcap_predict.run(config(root, tmp_path, max_images=1), captioner=captioner)
    first = gt_of(root)["annotations"][0]["segments_info"]
    boxes = [[s["bbox"][0], s["bbox"][1], s["bbox"][0] + s["bbox"][2], s["bbox"][1] + s["bbox"][3]] for s in first]
    assert [r.boxes[0] for r in captioner.asked] == boxes[::-1] and captioner.batches == -(-len(first) // 2)


def test_mask_aware_model_loaded_from_the_config_gets_masks(synthetic_pix2cap, tmp_path):
    from gpt4roi_sft.infer import DecodeSettings
    from quickstart.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=0, region_mode="mask")
    root = synthetic_pix2cap["root"]
    cfg = config(root, tmp_path / "out", model=Path(model_dir), max_images=1, eager=True,
                 decode=DecodeSettings(max_new_tokens=2))
    segcap_predict.run(cfg)  # the kit's lazily loaded captioner: a box-only request would be a ValueError
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(pred["annotations"][0]["segments_info"]) == len(gt_of(root)["annotations"][0]["segments_info"])


def two_stage_config(root, tmp_path, segmenter_dir, **kw):
    return config(root, tmp_path / "out", segmenter=segmenter_dir, max_images=2, **kw)


def test_segmentations_of_another_segmenter_are_refused_naming_it(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    cfg = two_stage_config(root, tmp_path, fake_model(tmp_path / "seg1", 0.0))
    segcap_predict.run(cfg, captioner=RecordingCaptioner(), segmenter=WholeImageSegmenter())
    cfg.segmenter = fake_model(tmp_path / "seg2", 1.0)
    with pytest.raises(DataError, match=r"segments.partial.jsonl: written by another setup \(changed segmenter: "):
        segcap_predict.run(cfg, captioner=RecordingCaptioner(), segmenter=WholeImageSegmenter())


def test_segmentations_with_other_thresholds_are_refused_naming_them(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    cfg = two_stage_config(root, tmp_path, fake_model(tmp_path / "seg1"))
    segcap_predict.run(cfg, captioner=RecordingCaptioner(), segmenter=WholeImageSegmenter())
    cfg.segmenter_settings = segcap_predict.SegmenterSettings(threshold=0.5)
    with pytest.raises(DataError, match=r"segments.partial.jsonl: .*changed thresholds.threshold: 0.8 -> 0.5"):
        segcap_predict.run(cfg, captioner=RecordingCaptioner(), segmenter=WholeImageSegmenter())


def test_overwrite_segments_and_captions_again_with_another_segmenter(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model

    root = synthetic_pix2cap["root"]
    cfg = two_stage_config(root, tmp_path, fake_model(tmp_path / "seg1", 0.0))
    segcap_predict.run(cfg, captioner=RecordingCaptioner(), segmenter=WholeImageSegmenter())
    cfg.segmenter, cfg.overwrite = fake_model(tmp_path / "seg2", 1.0), True
    segmenter, captioner = WholeImageSegmenter(), RecordingCaptioner()
    segcap_predict.run(cfg, captioner=captioner, segmenter=segmenter)
    assert segmenter.seen == 2 and len(captioner.asked) == 2


def test_metrics_name_the_model_and_the_segmenter(synthetic_pix2cap, tmp_path):
    from test_harness import fake_model
    from gpt4roi_sft.provenance import weights_fingerprint

    root = synthetic_pix2cap["root"]
    model, seg = fake_model(tmp_path / "m1"), fake_model(tmp_path / "seg1", 1.0)
    (model / "export_info.json").write_text(json.dumps({"step": 700}))
    cfg = two_stage_config(root, tmp_path, seg, model=model)
    cfg.evaluate = True
    metrics = segcap_predict.run(cfg, captioner=RecordingCaptioner(), segmenter=WholeImageSegmenter())
    assert metrics["provenance"]["produced_by"]["model"]["fingerprint"] == weights_fingerprint(model)
    text = (tmp_path / "out" / "metrics.txt").read_text()
    assert f"model: {model} (weights {weights_fingerprint(model)}, exported at step 700)" in text
    assert f"segmenter: {seg} (weights {weights_fingerprint(seg)})" in text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["provenance"] == metrics["provenance"]
