"""eval.vipbench: data validation, region-mode prompts and boxes, resumable answers, grading and aggregation."""

import json

import pytest

from eval import vipbench
from eval.judge import JudgeSettings
from data_converters.synthetic_vipbench import build_fixture
from gpt4roi_sft.errors import ConfigError, DataError
from tests.test_judge import ScriptedJudgeServer

SECRET = "sk-vip-SECRET-987"


@pytest.fixture
def data(tmp_path):
    build_fixture(tmp_path / "vip", num_questions=8, seed=1)
    return tmp_path / "vip"


class FakeCaptioner:
    def __init__(self):
        self.requests = []

    def __call__(self, requests):
        self.requests.extend(requests)
        return [f"answer {len(self.requests) - len(requests) + i}" for i in range(len(requests))]


def write_labelme(folder, name, shapes, **fields):
    (folder / name).write_text(json.dumps({"shapes": shapes, "imagePath": name.replace(".json", ".png"), **fields}))


def test_polygon_shape_becomes_its_enclosing_box(tmp_path):
    write_labelme(tmp_path, "s.json", [{"label": "obj1", "shape_type": "polygon",
                                         "points": [[10, 5], [30, 8], [25, 40], [12, 33]]}])
    assert vipbench.labelme_boxes(tmp_path / "s.json") == {"obj1": [10.0, 5.0, 30.0, 40.0]}


def test_a_shape_with_string_coordinates_is_an_error_naming_the_file_and_shape(tmp_path):
    write_labelme(tmp_path, "s.json", [{"label": "obj1", "shape_type": "rectangle", "points": [["10", "5"], [30, 40]]}])
    with pytest.raises(DataError, match=r"s\.json: shape 1 \(obj1\) needs at least 2 \[x, y\] points of numbers, "
                                        r"got \[\['10', '5'\], \[30, 40\]\]"):
        vipbench.labelme_boxes(tmp_path / "s.json")


@pytest.mark.parametrize("field", ["imageWidth", "imageHeight"])
@pytest.mark.parametrize("value", ["640", 0, True, [640]])
def test_an_image_size_that_is_not_a_positive_number_is_an_error_naming_the_field(tmp_path, field, value):
    """A string size used to skip the check of every box against the image without a word."""
    sizes = {"imageWidth": 640, "imageHeight": 480, field: value}
    write_labelme(tmp_path, "s.json", [{"label": "obj1", "shape_type": "rectangle", "points": [[10, 5], [30, 40]]}],
                  **sizes)
    with pytest.raises(DataError, match=rf"s\.json: {field} must be a positive number"):
        vipbench.labelme_boxes(tmp_path / "s.json")


def test_a_box_outside_the_labelme_image_size_is_an_error(tmp_path):
    write_labelme(tmp_path, "s.json", [{"label": "obj1", "shape_type": "rectangle", "points": [[700, 5], [730, 40]]}],
                  imageWidth=640, imageHeight=480)
    with pytest.raises(DataError, match=r"s\.json: obj1"):
        vipbench.labelme_boxes(tmp_path / "s.json")


def test_each_obj_n_gets_its_own_shape_box_in_text_order(tmp_path):
    write_labelme(tmp_path, "s.json", [
        {"label": "obj1", "shape_type": "rectangle", "points": [[50, 60], [10, 20]]},
        {"label": "obj2", "shape_type": "polygon", "points": [[100, 100], [140, 110], [120, 150]]}])
    prompt, boxes = vipbench.region_prompt("Is <obj2> bigger than <obj1>?", vipbench.labelme_boxes(tmp_path / "s.json"))
    assert prompt == "The <image> provides an overview of the picture.\nIs region2 <bbox> bigger than region1 <bbox>?"
    assert boxes == [[100.0, 100.0, 140.0, 150.0], [10.0, 20.0, 50.0, 60.0]]


def test_bare_obj_is_region1_and_backticks_are_optional():
    prompt, boxes = vipbench.region_prompt("What is <obj>?", {"obj": [1, 2, 3, 4]}, backticks=True)
    assert prompt.endswith("What is `region1 <bbox>`?") and boxes == [[1, 2, 3, 4]]


def test_region_mode_requests_use_source_image_and_meta_boxes(data):
    questions = vipbench.load_vipbench(data, "bbox")
    q = next(q for q in questions if "<obj1>" in q.meta_question)
    req = vipbench.make_request(q, "region")
    assert req.image == q.source_image and req.prompt.count("<bbox>") == len(req.boxes) == 2
    assert req.boxes == [q.obj_boxes["obj"], q.obj_boxes["obj2"]]


def test_visual_mode_uses_the_drawn_image_and_split_text(data):
    q = vipbench.load_vipbench(data, "human", mode="visual")[0]
    req = vipbench.make_request(q, "visual")
    assert req.image == data / "human" / "images" / q.split_image.name and req.boxes == []
    assert "within the red circle" in req.prompt


def test_question_naming_a_missing_shape_is_an_error_naming_it(data):
    meta = json.loads((data / "vip-bench-meta-data.json").read_text())
    meta["v1_2"]["question"] = "What is <obj7>?"
    (data / "vip-bench-meta-data.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"v1_2: question names <obj7>"):
        vipbench.load_vipbench(data, "bbox")


def test_a_question_line_that_is_not_utf8_is_named_with_its_file_and_line(data):
    path = data / "bbox" / "questions.jsonl"
    lines = path.read_bytes().splitlines()
    lines[1] = lines[1].replace(b'"text": "', b'"text": "\xff', 1)
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"1 problem\(s\).*{path} line 2: not UTF-8 text \(byte \d+ of the line: 0xff\)"):
        vipbench.load_vipbench(data, "bbox")


def test_question_missing_from_meta_and_missing_image_are_all_reported(data):
    meta = json.loads((data / "vip-bench-meta-data.json").read_text())
    del meta["v1_1"]
    (data / "vip-bench-meta-data.json").write_text(json.dumps(meta))
    (data / "human" / "images" / "v1_3_3.png").unlink()
    with pytest.raises(DataError, match=r"2 problem\(s\).*v1_1 missing.*v1_3: image"):
        vipbench.load_vipbench(data, "human", mode="visual")


def q(qid, caps):
    return vipbench.VipQuestion(qid, 0, "t", None, "m", "a", caps, None)


def test_aggregation_matches_hand_computed_scores():
    questions = [q("v1_0", ["rec"]), q("v1_1", ["rec", "ocr"]), q("v1_2", ["ocr", "math"]), q("v1_3", ["math"])]
    scores = {"v1_0": {0: 1.0, 1: 0.5}, "v1_1": {0: 0.5, 1: 0.5}, "v1_2": {0: 0.0, 1: 0.2}, "v1_3": {0: 0.3, 1: 0.3}}
    out = vipbench.aggregate(questions, scores, runs=2)
    # run 0: rec (1+.5)/2=75, ocr (.5+0)/2=25, math (0+.3)/2=15, all 1.8/4=45
    # run 1: rec 50, ocr 35, math 25, all 1.5/4=37.5
    assert out["runs"][0]["by_capability"] == pytest.approx({"math": 15.0, "ocr": 25.0, "rec": 75.0})
    assert out["overall"] == pytest.approx(41.25) and out["std"] == pytest.approx(3.75)
    assert out["by_capability"] == pytest.approx({"math": 20.0, "ocr": 30.0, "rec": 62.5})
    assert out["complete"] is True


def test_paper_row_orders_columns_and_maps_mmvet_names():
    row = vipbench.paper_row({"by_capability": {"rec": 1.0, "spat": 2.0, "gen": 3.0, "odd": 4.0}, "overall": 5.0})
    assert list(row) == ["Rec", "OCR", "Know", "Math", "Rel", "Lang", "odd", "All"]
    assert (row["Rel"], row["Lang"], row["OCR"]) == (2.0, 3.0, None)


def config(data, tmp_path, judge=None, runs=1):
    return vipbench.VipBenchConfig(data=data, split="bbox", out=tmp_path / "out", judge=judge, runs=runs, batch_size=3)


def test_without_judge_answers_are_written_ungraded_and_the_report_says_so(data, tmp_path):
    scores = vipbench.run(config(data, tmp_path), FakeCaptioner())
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == [f"v1_{i}" for i in range(8)]
    assert scores["overall"] is None and len(scores["ungraded"]) == 8
    assert "Ungraded" in (out / "report.md").read_text()
    assert not (out / "grades.json").exists()


def test_interrupted_generation_resumes_without_repeating_questions(data, tmp_path):
    class Dying(FakeCaptioner):
        def __call__(self, requests):
            if self.requests:
                raise KeyboardInterrupt
            return super().__call__(requests)

    with pytest.raises(KeyboardInterrupt):
        vipbench.run(config(data, tmp_path), Dying())
    rest = FakeCaptioner()
    vipbench.run(config(data, tmp_path), rest)
    assert len(rest.requests) == 5
    lines = [json.loads(l) for l in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert "store_metadata" in lines[0]
    assert sorted(r["id"] for r in lines[1:]) == sorted(f"v1_{i}" for i in range(8))


def test_graded_run_scores_caches_and_rerun_asks_the_judge_nothing(data, tmp_path):
    with ScriptedJudgeServer(default=("reply", "0.5"), model_id="local-judge") as server:
        judge = JudgeSettings(base_url=server.base_url, model="local-judge", backoff_s=0.01, concurrency=2)
        first = vipbench.run(config(data, tmp_path, judge, runs=2), FakeCaptioner(), api_key=SECRET)
        n = len(server.requests)
        again = vipbench.run(config(data, tmp_path, judge, runs=2), FakeCaptioner(), api_key=SECRET)
        assert len(server.requests) == n == 16
    assert first["overall"] == pytest.approx(50.0) and again["overall"] == first["overall"]
    assert first["judge"] == "local-judge" and first["complete"]
    sent = server.requests[0]["body"]["messages"][0]["content"]
    assert " | answer " in sent and "within the red rectangle" in sent
    out = tmp_path / "out"
    assert {"scores.json", "scores.csv", "report.md", "grades.json", "results.json"} <= {p.name for p in out.iterdir()}
    assert "| 50.0 |" in (out / "report.md").read_text()
    assert SECRET not in "".join(p.read_text() for p in out.iterdir() if p.is_file())


def test_a_judge_backend_passed_in_grades_the_run(data, tmp_path):
    from tests.test_judge import ScriptedBackend

    scores = vipbench.run(config(data, tmp_path), FakeCaptioner(), judge=ScriptedBackend(["1.0"] * 8))
    assert scores["overall"] == pytest.approx(100.0) and scores["judge"] == "scripted-1" and scores["complete"]


def test_judge_flags_must_come_together(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        vipbench.main(["--data", str(tmp_path), "--split", "bbox", "--out", str(tmp_path / "o"),
                       "--judge-base-url", "http://127.0.0.1:9/v1"])


def test_fixture_cli_writes_the_official_layout(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "data_converters.synthetic_vipbench", "--out", str(tmp_path / "f"), "--questions", "4"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rel in ("vip-bench-meta-data.json", "bbox/questions.jsonl", "human/questions.jsonl", "source_image/v1_0.json"):
        assert (tmp_path / "f" / rel).is_file()
    assert len(vipbench.load_vipbench(tmp_path / "f", "bbox")) == 4


def test_tiny_model_region_mode_end_to_end_with_a_local_judge(tmp_path):
    pytest.importorskip("quickstart.tiny_model", reason="the tiny-model factory is not in this checkout")
    from gpt4roi_sft.infer import DecodeSettings, load_captioner
    from quickstart.tiny_model import build_tiny_model

    build_tiny_model(str(tmp_path / "model"))
    build_fixture(tmp_path / "vip", num_questions=4, seed=2)
    captioner = load_captioner(str(tmp_path / "model"), settings=DecodeSettings(max_new_tokens=5), device="cpu")
    with ScriptedJudgeServer([("reply", "oops")], default=("reply", "0.0")) as server:
        judge = JudgeSettings(base_url=server.base_url, model="local-judge", backoff_s=0.01)
        scores = vipbench.run(vipbench.VipBenchConfig(data=tmp_path / "vip", split="bbox", out=tmp_path / "out",
                                                      judge=judge), captioner)
    assert len(server.requests) == 5  # one parse failure re-asked once
    assert scores["overall"] == 0.0 and scores["complete"]
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 4
