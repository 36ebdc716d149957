"""eval.caption_metrics: the same numbers as pycocoevalcap's COCOEvalCap, offline, with SPICE reported honestly."""

import json
import logging

import pytest

from eval.caption_metrics import METRIC_KEYS, format_metrics_table, score_captions, spice_unavailable_reason

REFERENCES = {
    1: ["a red square on green grass"],
    2: ["a blue circle in the blue sky"],
    3: ["a small yellow triangle near the top, left of a tree"],
    4: ["the white cloud is large and fluffy"],
}
PREDICTIONS = {
    1: "a red square on the grass",
    2: "a blue circle in the sky",
    3: "yellow triangle near a tree.",
    4: "",
}


def _cocoevalcap_scores(tmp_path, monkeypatch):
    """Run pycocoevalcap's own COCOEvalCap path (GLaMM's evaluate.py) with Spice removed from its scorers."""
    from pycocotools.coco import COCO  # noqa: F401  (pycocoevalcap depends on it)
    import pycocoevalcap.eval as cocoeval

    class NoSpice:
        def compute_score(self, gts, res):
            return float("nan"), [float("nan")] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(cocoeval, "Spice", NoSpice)
    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in REFERENCES],
        "annotations": [{"id": i, "image_id": i, "caption": c[0], "bbox": [0, 0, 1, 1]} for i, c in REFERENCES.items()],
        "type": "captions", "info": {}, "licenses": [],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()]))
    coco = COCO(str(gt_path))
    res = coco.loadRes(str(pred_path))
    ev = cocoeval.COCOEvalCap(coco, res)
    ev.params["image_id"] = res.getImgIds()
    ev.evaluate()
    return ev.eval


def test_metrics_equal_pycocoevalcap_cocoevalcap(tmp_path, monkeypatch):
    ours, _ = score_captions(REFERENCES, PREDICTIONS)
    theirs = _cocoevalcap_scores(tmp_path, monkeypatch)
    for key in METRIC_KEYS[:-1]:
        assert ours[key] == theirs[key], key


def test_one_meteor_process_serves_every_scoring_and_answers_as_a_fresh_one():
    """Scorings share the process's METEOR 1.5 (its ~10 s start-up paid once); what it scored before changes
    nothing: a fresh jar scores the same pairs to the same values."""
    from eval.caption_metrics import MeteorJar, shared_meteor_jar

    first, _ = score_captions(REFERENCES, PREDICTIONS)
    pid = shared_meteor_jar().proc.pid
    other, _ = score_captions({1: ["a green tree"], 2: ["grass below the sky"]}, {1: "a tree", 2: "the sky"})
    again, _ = score_captions(REFERENCES, PREDICTIONS)
    assert shared_meteor_jar().proc.pid == pid and again == first and other["METEOR"] != first["METEOR"]
    with MeteorJar() as fresh:
        alone, _ = score_captions(REFERENCES, PREDICTIONS, meteor=fresh)
    assert alone == first


def test_metrics_have_exactly_the_paper_keys_as_fractions():
    metrics, _ = score_captions(REFERENCES, PREDICTIONS)
    assert tuple(metrics) == METRIC_KEYS
    assert 0.0 < metrics["Bleu_1"] <= 1.0 and 0.0 < metrics["METEOR"] <= 1.0


def test_spice_is_null_with_one_logged_reason_when_jars_are_absent(caplog):
    with caplog.at_level(logging.WARNING, logger="eval.caption_metrics"):
        metrics, note = score_captions(REFERENCES, PREDICTIONS)
    assert metrics["SPICE"] is None
    assert "CoreNLP" in note
    spice_lines = [r for r in caplog.records if "SPICE" in r.getMessage()]
    assert len(spice_lines) == 1


def test_spice_jar_folder_missing_a_jar_is_named(tmp_path):
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    reason = spice_unavailable_reason(tmp_path)
    assert "stanford-corenlp-3.6.0-models.jar" in reason


def test_predictions_must_cover_the_reference_ids():
    with pytest.raises(ValueError, match="different ids"):
        score_captions(REFERENCES, {1: "a red square"})


def test_table_prints_x100_and_dash_for_missing_spice():
    table = format_metrics_table({**{k: 0.5 for k in METRIC_KEYS}, "CIDEr": 1.452, "SPICE": None})
    assert "145.2" in table and "50.0" in table and table.splitlines()[1].rstrip().endswith("-")
