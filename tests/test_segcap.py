"""eval.segcap: Pix2Cap's panoptic segmentation-captioning benchmark with panopticapi's matching rules.

Hand-computed cases pin each panopticapi rule (dropped ground truth, the union that subtracts only ground-truth
VOID, crowd regions, spurious segments, strict IoU > 0.5, per-category averaging); torchmetrics' PanopticQuality
is a peer on predictions without VOID pixels (where its rules coincide with panopticapi's); the caption metrics
equal pycocoevalcap's scorers on the matched pairs times n_matched / (TP + FP + FN); mAP is checked by hand.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_converters.synthetic import decode_panoptic, encode_panoptic
from eval import segcap
from gpt4roi_sft.errors import DataError

CATS = {1: {"id": 1, "name": "circle", "isthing": 1}, 2: {"id": 2, "name": "square", "isthing": 1},
        101: {"id": 101, "name": "sky", "isthing": 0}, 102: {"id": 102, "name": "grass", "isthing": 0}}


def seg(sid, cat, area=None, crowd=0, text="a caption"):
    out = {"id": sid, "category_id": cat, "iscrowd": crowd, "description": text, "caption": text}
    if area is not None:
        out["area"] = area
    return out


def image_result(gt_ids, pred_ids, gt_segments, pred_segments):
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    for s in gt_segments:
        s.setdefault("area", int((gt_ids == s["id"]).sum()))
    gt_ann = {"image_id": 7, "file_name": "7.png", "segments_info": gt_segments}
    pred_ann = {"image_id": 7, "file_name": "7.png", "segments_info": pred_segments}
    return segcap.evaluate_image(gt_ann, pred_ann, gt_ids, pred_ids, CATS)


# ---------------------------------------------------------------- panopticapi rules, by hand


def test_dropped_segment_is_a_false_negative_even_where_the_prediction_is_void():
    gt = [[1, 1, 2, 2]] * 2
    pred = [[1, 1, 0, 0]] * 2  # segment 2 dropped: VOID in the prediction
    r = image_result(gt, pred, [seg(1, 1), seg(2, 2)], [seg(1, 1)])
    assert r.stats[1] == [1.0, 1, 0, 0]
    assert r.stats[2] == [0.0, 0, 0, 1]
    assert segcap.pq_average(r.stats, CATS, None)["PQ"] == pytest.approx(0.5)


def test_union_subtracts_ground_truth_void_but_not_predicted_void():
    # gt: segment 1 on 6 pixels, VOID on 2, segment 2 on 10; the prediction spreads 1 onto the gt VOID and
    # leaves 4 pixels of segment 2 VOID.
    gt = [[1, 1, 1, 0, 2, 2, 2, 2, 2],
          [1, 1, 1, 0, 2, 2, 2, 2, 2]]
    pred = [[1, 1, 1, 1, 2, 2, 2, 0, 0],
            [1, 1, 1, 1, 2, 2, 2, 0, 0]]
    r = image_result(gt, pred, [seg(1, 1), seg(2, 2)], [seg(1, 1), seg(2, 2)])
    assert r.stats[1][0] == pytest.approx(6 / (8 + 6 - 6 - 2))  # 1.0: its VOID overlap leaves the union
    assert r.stats[2][0] == pytest.approx(6 / (6 + 10 - 6))  # 0.6: predicted VOID stays in the union


def test_iou_of_exactly_one_half_is_not_a_match():
    gt = [[1, 1, 2, 2]]
    pred = [[1, 5, 5, 5]]  # gt segment 1 has IoU 1/2 with predicted 1
    r = image_result(gt, pred, [seg(1, 1), seg(2, 2)], [seg(1, 1), seg(5, 2)])
    assert r.stats[1] == [0.0, 0, 1, 1]


def test_crowd_region_is_never_a_false_negative_and_absorbs_predictions_of_its_category():
    gt = [[3, 3, 3, 3, 3, 3, 3, 3, 9, 9]]  # 3: crowd circles; 9: sky
    pred = [[4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]  # one circle over the crowd and the sky: 8/10 on crowd
    r = image_result(gt, pred, [seg(3, 1, crowd=1), seg(9, 101)], [seg(4, 1)])
    assert r.stats.get(1, [0.0, 0, 0, 0]) == [0.0, 0, 0, 0]  # neither FP nor FN for circles
    assert r.stats[101] == [0.0, 0, 0, 1]


def test_prediction_over_a_crowd_region_of_another_category_is_a_false_positive():
    gt = [[3, 3, 3, 3, 3, 3, 3, 3, 9, 9]]
    pred = [[4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]
    r = image_result(gt, pred, [seg(3, 1, crowd=1), seg(9, 101)], [seg(4, 2)])  # a square over crowd circles
    assert r.stats[2] == [0.0, 0, 1, 0]


def test_spurious_segment_is_a_false_positive_unless_mostly_on_ground_truth_void():
    gt = [[1, 1, 1, 1, 0, 0, 0, 0]]
    pred = [[1, 1, 1, 6, 7, 7, 7, 1]]  # 6: on segment 1; 7: all on VOID
    r = image_result(gt, pred, [seg(1, 1)], [seg(1, 1), seg(6, 2), seg(7, 2)])
    assert r.stats[2] == [0.0, 0, 1, 0]  # 6 counts, 7 is ignored
    assert r.stats[1] == [pytest.approx(3 / (4 + 4 - 3 - 1)), 1, 0, 0]


def test_wrong_category_is_one_false_positive_and_one_false_negative():
    gt = [[1, 1, 1, 1]]
    r = image_result(gt, gt, [seg(1, 1)], [seg(1, 2)])
    assert r.stats[1] == [0.0, 0, 0, 1] and r.stats[2] == [0.0, 0, 1, 0]


def test_pq_averages_over_categories_with_any_tp_fp_fn_and_splits_things_and_stuff():
    stats = {1: [0.9, 1, 0, 0], 2: [0.0, 0, 1, 1], 101: [1.6, 2, 0, 2]}  # square: all wrong; 102 absent
    all_ = segcap.pq_average(stats, CATS, None)
    things = segcap.pq_average(stats, CATS, True)
    stuff = segcap.pq_average(stats, CATS, False)
    assert all_["n"] == 3 and things["n"] == 2 and stuff["n"] == 1
    assert things["PQ"] == pytest.approx((0.9 + 0.0) / 2)
    assert stuff["PQ"] == pytest.approx(1.6 / 3) and stuff["SQ"] == pytest.approx(0.8) and stuff["RQ"] == pytest.approx(2 / 3)
    assert all_["SQ"] == pytest.approx((0.9 + 0.0 + 0.8) / 3)


def test_ground_truth_ids_missing_from_its_json_are_not_void():
    gt = [[1, 1, 8, 8]]  # 8 is in the PNG only
    r = image_result(gt, [[1, 1, 1, 1]], [seg(1, 1)], [seg(1, 1)])
    assert r.stats[1] == [0.0, 0, 1, 1]  # the union keeps id 8's pixels: IoU 2/4, no match (as VOID it would be 1)


# ---------------------------------------------------------------- mAP, by hand


def test_average_precision_is_101_point_interpolated_over_records_in_order():
    ious = np.array([0.9, 0.9, 0.9])
    meteors = np.array([0.5, 0.0, 0.5])  # tp, fp (METEOR not > 0), tp; recall 1/3, 1/3, 2/3
    ap = segcap.average_precision(ious, meteors, np.ones(3, dtype=bool), 3, 0.5, 0.0)
    assert ap == pytest.approx((34 * 1.0 + 33 * (2 / 3)) / 101)


def test_map_is_the_mean_over_iou_and_meteor_thresholds():
    # one record with IoU 0.55 and METEOR 0.12 is a hit for IoU {0.3, 0.4, 0.5} x METEOR {0, 0.05, 0.1}
    out = segcap.densecap_map([(0.55, "a dog", "a dog")], [0.12], num_gt=1)
    assert out["mAP"] == pytest.approx(9 / 30)
    assert out["mAP_det"] == pytest.approx(3 / 5)
    assert len(out["breakdown"]) == 30


def test_map_counts_an_empty_caption_as_a_miss():
    out = segcap.densecap_map([(0.9, "", "a dog")], [0.9], num_gt=1)
    assert out["mAP"] == 0.0


def test_map_pairs_each_prediction_with_its_best_iou_ground_truth_in_pix2cap_order():
    gt = [[1, 1, 1, 2, 2, 2, 2, 2]]
    pred = [[5, 5, 4, 4, 4, 4, 4, 4]]  # 4 overlaps gt 1 (IoU 1/8) and gt 2 (IoU 5/6); 5 only gt 1
    r = image_result(gt, pred, [seg(1, 1, text="g1"), seg(2, 1, text="g2")],
                     [seg(4, 1, text="p4"), seg(5, 1, text="p5")])
    assert [(p, g) for _, p, g in r.records] == [("p5", "g1"), ("p4", "g2")]
    assert r.records[1][0] == pytest.approx(5 / 6)


def test_nltk_meteor_scores_the_prediction_against_the_ground_truth():
    meteor_score = pytest.importorskip("nltk.translate.meteor_score").meteor_score

    class NoSynonyms:  # a WordNet stand-in: exact and stem matches only
        def synsets(self, *args, **kwargs):
            return []

    name, scorer, _ = segcap.resolve_map_meteor("nltk", wordnet=NoSynonyms())
    records = [(0.9, "a red circle in the sky", "the red circle sits in the clear sky")]
    assert name == "nltk"
    expected = meteor_score([records[0][2].split()], records[0][1].split(), wordnet=NoSynonyms())
    assert scorer(records) == [pytest.approx(expected)] and 0 < expected < 1


# ---------------------------------------------------------------- synthetic val split, perturbed predictions


def _write_png(path: Path, ids: np.ndarray) -> None:
    Image.fromarray(encode_panoptic(ids)).save(path)


def perturb(root: Path, out: Path, void: bool = False):
    """Predictions for the synthetic val split: each image dropped / merged / shifted / spurious / relabelled.

    Vacated pixels go to VOID when ``void`` else to the lower stuff segment, so ``void=False`` leaves no VOID.
    Captions: the description, a reworded one, or empty.
    """
    gt = json.loads((root / "annotations" / "pix2cap_coco_val.json").read_text())
    (out / "png").mkdir(parents=True)
    annotations = []
    for k, ann in enumerate(gt["annotations"]):
        ids = decode_panoptic(np.asarray(Image.open(root / "panoptic_val2017" / ann["file_name"]).convert("RGB")))
        segs = {s["id"]: dict(s) for s in ann["segments_info"]}
        things = [s for s in ann["segments_info"] if s["category_id"] < 100]
        ground = [s for s in ann["segments_info"] if s["category_id"] > 101][0]["id"]
        pred = ids.copy()
        fill = 0 if void else ground
        mode = k % 6
        if mode == 1:  # dropped
            pred[ids == things[0]["id"]] = fill
            del segs[things[0]["id"]]
        elif mode == 2:  # merged into the neighbour (its category wins)
            pred[ids == things[1]["id"]] = things[0]["id"]
            del segs[things[1]["id"]]
        elif mode == 3:  # shifted right by a third of its width
            mask = ids == things[0]["id"]
            pred[mask] = fill
            dx = max(2, things[0]["bbox"][2] // 3)
            pred[:, dx:][mask[:, :-dx]] = things[0]["id"]
        elif mode == 4:  # spurious square in the sky
            pred[2:12, 2:12] = 4242
            segs[4242] = {"id": 4242, "category_id": 2, "iscrowd": 0, "description": ""}
        elif mode == 5:  # wrong category
            segs[things[0]["id"]]["category_id"] = 1 + things[0]["category_id"] % 3
        present = set(np.unique(pred).tolist())
        infos = []
        for j, s in enumerate(v for v in segs.values() if v["id"] in present):
            words = s["description"].split()
            caption = s["description"] if j % 3 == 0 else (" ".join(words[::-1]) if j % 3 == 1 else "")
            infos.append({"id": s["id"], "category_id": s["category_id"], "caption": caption})
        _write_png(out / "png" / ann["file_name"], pred)
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": infos})
    (out / "pred.json").write_text(json.dumps({"annotations": annotations, "categories": gt["categories"]}))
    return gt, out / "pred.json", out / "png"


def reference_matching(gt: dict, root: Path, pred_json: Path, pred_dir: Path):
    """An independent, pixel-by-pixel panopticapi matching: (matched pairs, TP, FP, FN)."""
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    pairs, tp, fp, fn = [], 0, 0, 0
    for ann in gt["annotations"]:
        g_ids = decode_panoptic(np.asarray(Image.open(root / "panoptic_val2017" / ann["file_name"]).convert("RGB")))
        p_ann = pred[ann["image_id"]]
        p_ids = decode_panoptic(np.asarray(Image.open(pred_dir / p_ann["file_name"]).convert("RGB")))
        g_hit, p_hit = set(), set()
        for g in ann["segments_info"]:
            for p in p_ann["segments_info"]:
                if g["category_id"] != p["category_id"]:
                    continue
                gm, pm = g_ids == g["id"], p_ids == p["id"]
                inter = (gm & pm).sum()
                union = pm.sum() + g["area"] - inter - ((g_ids == 0) & pm).sum()
                if inter / union > 0.5:
                    g_hit.add(g["id"])
                    p_hit.add(p["id"])
                    pairs.append((f"{ann['image_id']}_{g['id']}", g["description"], p["caption"]))
        tp += len(g_hit)
        fn += len(ann["segments_info"]) - len(g_hit)
        fp += sum(1 for p in p_ann["segments_info"] if p["id"] not in p_hit
                  and ((g_ids == 0) & (p_ids == p["id"])).sum() / (p_ids == p["id"]).sum() <= 0.5)
    return pairs, tp, fp, fn


@pytest.fixture(scope="module")
def perturbed(synthetic_pix2cap, tmp_path_factory):
    root = synthetic_pix2cap["root"]
    gt, pred_json, pred_dir = perturb(root, tmp_path_factory.mktemp("segcap_pred"))
    out = tmp_path_factory.mktemp("segcap_eval")
    proc = subprocess.run([sys.executable, "-m", "eval.segcap", "--gt-json", str(root / "annotations" / "pix2cap_coco_val.json"),
                           "--gt-dir", str(root / "panoptic_val2017"), "--pred-json", str(pred_json),
                           "--pred-dir", str(pred_dir), "--out", str(out), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"root": root, "gt": gt, "pred_json": pred_json, "pred_dir": pred_dir, "out": out, "stdout": proc.stdout,
            "metrics": json.loads((out / "metrics.json").read_text())}


def test_cli_writes_every_metric_key_as_fractions_and_the_x100_table(perturbed):
    m = perturbed["metrics"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "BLEU-4", "METEOR",
                "ROUGE-L", "CIDEr", "SPICE", "mAP", "TP", "FP", "FN", "n_matched", "images"):
        assert key in m, key
    assert 0 < m["PQ"] < 1 and 0 < m["mAP"] < 1 and m["images"] == 8
    table = (perturbed["out"] / "metrics.txt").read_text()
    assert f"{100 * m['PQ']:.1f}" in table and f"{100 * m['ROUGE-L']:.1f}" in table
    assert "SPICE under the ROUGE header" in table  # the note on Pix2Cap's swapped columns


def test_counts_match_an_independent_pixel_level_matching(perturbed):
    pairs, tp, fp, fn = reference_matching(perturbed["gt"], perturbed["root"], perturbed["pred_json"], perturbed["pred_dir"])
    m = perturbed["metrics"]
    assert (m["TP"], m["FP"], m["FN"], m["n_matched"]) == (tp, fp, fn, len(pairs))
    assert fp > 0 and fn > 0  # the perturbations produced both kinds of error


def test_pq_equals_torchmetrics_on_predictions_without_void(perturbed):
    tm = pytest.importorskip("torchmetrics.detection")
    import torch

    cats = {c["id"]: c for c in perturbed["gt"]["categories"]}
    pred = {a["image_id"]: a for a in json.loads(perturbed["pred_json"].read_text())["annotations"]}
    metric = tm.PanopticQuality(things={c for c in cats if cats[c]["isthing"]},
                                stuffs={c for c in cats if not cats[c]["isthing"]}, return_sq_and_rq=True)
    for ann in perturbed["gt"]["annotations"]:
        maps = []
        for folder, a in ((perturbed["root"] / "panoptic_val2017", ann), (perturbed["pred_dir"], pred[ann["image_id"]])):
            ids = decode_panoptic(np.asarray(Image.open(folder / a["file_name"]).convert("RGB")))
            assert (ids != 0).all()
            cat = np.zeros_like(ids)
            for s in a["segments_info"]:
                cat[ids == s["id"]] = s["category_id"]
            maps.append(torch.from_numpy(np.stack([cat, ids], -1))[None])
        metric.update(maps[1], maps[0])
    pq, sq, rq = (float(v) for v in metric.compute())
    m = perturbed["metrics"]
    assert (m["PQ"], m["SQ"], m["RQ"]) == (pytest.approx(pq, abs=1e-6), pytest.approx(sq, abs=1e-6), pytest.approx(rq, abs=1e-6))


def test_caption_metrics_are_pycocoevalcap_on_matched_pairs_scaled_by_matched_over_tp_fp_fn(perturbed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pairs, tp, fp, fn = reference_matching(perturbed["gt"], perturbed["root"], perturbed["pred_json"], perturbed["pred_dir"])
    gts = PTBTokenizer().tokenize({k: [{"caption": g}] for k, g, _ in pairs})
    res = PTBTokenizer().tokenize({k: [{"caption": p}] for k, _, p in pairs})
    scale = len(pairs) / (tp + fp + fn)
    m = perturbed["metrics"]
    assert m["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res)[0][3] * scale, abs=1e-9)
    assert m["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0] * scale, abs=1e-9)
    assert m["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0] * scale, abs=1e-9)
    assert m["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0] * scale, abs=1e-9)
    assert m["caption_scale"] == pytest.approx(scale) and scale < 1


def test_spice_without_jars_is_null_with_the_reason_said_once(perturbed):
    m = perturbed["metrics"]
    assert m["SPICE"] is None and "CoreNLP" in m["notes"]["spice"]
    assert perturbed["stdout"].count("SPICE: not computed") == 1


def test_void_in_predictions_is_scored_as_panopticapi_does(synthetic_pix2cap, tmp_path):
    root = synthetic_pix2cap["root"]
    gt, pred_json, pred_dir = perturb(root, tmp_path / "pred", void=True)
    results = list(segcap.stream_images(segcap.pair_annotations(segcap.load_panoptic(root / "annotations" / "pix2cap_coco_val.json"),
                                                                 segcap.load_panoptic(pred_json, needs_categories=False)),
                                        root / "panoptic_val2017", pred_dir, {c["id"]: c for c in gt["categories"]}))
    pairs, tp, fp, fn = reference_matching(gt, root, pred_json, pred_dir)
    assert sum(s[1] for r in results for s in r.stats.values()) == tp
    assert sum(s[2] for r in results for s in r.stats.values()) == fp
    assert sum(s[3] for r in results for s in r.stats.values()) == fn


# ---------------------------------------------------------------- bad input: one line naming image and segment


@pytest.fixture()
def small_case(tmp_path):
    """One 2x4 image: gt segments 1 (circle) and 2 (sky); a perfect prediction, to be broken by each test."""
    ids = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    _write_png(tmp_path / "gt" / "7.png", ids)
    _write_png(tmp_path / "pred" / "7.png", ids)
    gt = {"images": [{"id": 7, "file_name": "7.jpg", "width": 4, "height": 2}],
          "annotations": [{"image_id": 7, "file_name": "7.png",
                           "segments_info": [seg(1, 1, area=4), seg(2, 101, area=4)]}],
          "categories": list(CATS.values())}
    pred = json.loads(json.dumps(gt))
    (tmp_path / "gt.json").write_text(json.dumps(gt))

    def run(mutate_pred=None, pred_ids=None):
        p = json.loads(json.dumps(pred))
        if mutate_pred:
            mutate_pred(p)
        (tmp_path / "pred.json").write_text(json.dumps(p))
        if pred_ids is not None:
            _write_png(tmp_path / "pred" / "7.png", np.array(pred_ids))
        config = segcap.SegCapConfig(tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred",
                                     tmp_path / "out")
        return segcap.evaluate(config)

    return run


def test_png_id_absent_from_the_prediction_json_is_an_error_naming_image_and_segment(small_case):
    with pytest.raises(DataError, match=r"image 7 segment 5: id is in the PNG but not in segments_info"):
        small_case(pred_ids=[[1, 1, 2, 5], [1, 1, 2, 2]])


def test_json_segment_absent_from_the_png_is_an_error(small_case):
    with pytest.raises(DataError, match=r"image 7 segment 2: listed in segments_info but absent from the PNG"):
        small_case(pred_ids=[[1, 1, 1, 1], [1, 1, 0, 0]])


def test_category_not_in_the_ground_truth_is_an_error(small_case):
    def bad(p):
        p["annotations"][0]["segments_info"][0]["category_id"] = 55

    with pytest.raises(DataError, match=r"image 7 segment 1: category_id 55 is not a ground-truth category"):
        small_case(bad)


def test_duplicate_segment_id_is_an_error(small_case):
    def dup(p):
        p["annotations"][0]["segments_info"].append(seg(2, 102))

    with pytest.raises(DataError, match=r"image 7 segment 2: the id appears twice"):
        small_case(dup)


def test_missing_caption_is_an_error(small_case):
    def nocap(p):
        del p["annotations"][0]["segments_info"][1]["caption"]

    with pytest.raises(DataError, match=r"image 7 segment 2: 'caption' must be a string"):
        small_case(nocap)


def test_missing_prediction_png_is_an_error(small_case, tmp_path):
    (tmp_path / "pred" / "7.png").unlink()
    with pytest.raises(DataError, match=r"prediction image 7: PNG .*7.png not found"):
        small_case()


def test_image_without_a_prediction_is_an_error(small_case):
    def none(p):
        p["annotations"] = []

    with pytest.raises(DataError, match=r"image 7 has no prediction"):
        small_case(none)


def test_bad_input_exits_with_one_line_on_stderr(small_case, tmp_path):
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": []}))
    proc = subprocess.run([sys.executable, "-m", "eval.segcap", "--gt-json", str(tmp_path / "gt.json"),
                           "--gt-dir", str(tmp_path / "gt"), "--pred-json", str(tmp_path / "pred.json"),
                           "--pred-dir", str(tmp_path / "pred"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "image 7 has no prediction" in proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()
