"""eval.vg: validation before generation, resumable predictions, sharding, scoring and the CLI."""

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_module
from eval import vg
from eval.prediction_store import PredictionStore
from gpt4roi_sft.errors import ConfigError, DataError

COLOURS = ["red", "blue", "red", "yellow", "red", "blue"]
KINDS = ["circle", "square", "circle", "triangle", "square", "circle"]


def write_test_file(tmp_path, n=6, mutate=None):
    """A GLaMM-format test file with ``n`` samples over two images (file names repeat, as in GLaMM's)."""
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (10, 200, 30)).save(images_dir / name)
    data = {"images": [], "annotations": []}
    for i in range(1, n + 1):
        data["images"].append({"id": i, "file_name": "a.jpg" if i % 2 else "b.jpg", "width": 64, "height": 48})
        data["annotations"].append({"id": i, "image_id": i, "bbox": [2, 3, 20, 10],
                                    "caption": f"a {COLOURS[i - 1]} {KINDS[i - 1]} on the grass",
                                    "attributes": {"colour": COLOURS[i - 1], "kind": KINDS[i - 1]}})
    if mutate:
        mutate(data)
    path = tmp_path / "test_caption.json"
    path.write_text(json.dumps(data))
    return path, images_dir


class RecordingCaptioner:
    """Stands in for the model: answers with the true colour for odd ids; can die after some batches."""

    def __init__(self, die_after_batches=None):
        self.asked = []
        self.batches = 0
        self.die_after_batches = die_after_batches

    def __call__(self, requests):
        if self.die_after_batches is not None and self.batches >= self.die_after_batches:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.asked.extend(requests)
        return [f"a red circle number {len(self.asked) - len(requests) + k}" for k in range(len(requests))]


def config(tmp_path, ann, images, **kw):
    return vg.VGEvalConfig(annotations=ann, image_root=images, out=tmp_path / "out", batch_size=2, **kw)


def test_valid_file_gives_one_sample_per_image_entry_with_xyxy_box(tmp_path):
    ann, images = write_test_file(tmp_path)
    samples, skipped = vg.load_vg_test(ann, images)
    assert [s.sample_id for s in samples] == [1, 2, 3, 4, 5, 6] and skipped == []
    assert samples[0].box == [2.0, 3.0, 22.0, 13.0]
    assert samples[1].image_path == images / "b.jpg"


def assert_load_refused(tmp_path, mutate, match):
    """The test file changed by ``mutate`` is refused by load_vg_test with an error matching ``match``."""
    ann, images = write_test_file(tmp_path, mutate=mutate)
    with pytest.raises(DataError, match=match):
        vg.load_vg_test(ann, images)


def test_annotation_ids_not_matching_image_ids_is_an_error_naming_the_sample(tmp_path):
    def shift(data):
        data["annotations"][2]["id"] = 99
    assert_load_refused(tmp_path, shift, r"sample 3: no annotation with id 3")


def test_missing_image_file_is_an_error_naming_the_sample(tmp_path):
    def missing(data):
        data["images"][4]["file_name"] = "gone.jpg"
    assert_load_refused(tmp_path, missing, r"sample 5: image file .*gone.jpg not found")


def test_empty_reference_caption_is_an_error_naming_the_sample(tmp_path):
    def empty(data):
        data["annotations"][1]["caption"] = "  "
    assert_load_refused(tmp_path, empty, r"sample 2: empty reference caption")


def _box_outside(data):
    data["annotations"][2]["bbox"] = [70, 3, 10, 10]  # the images are 64x48


def test_a_box_outside_the_image_is_refused_before_generation_naming_the_file_and_1_based_entry(tmp_path):
    ann, images = write_test_file(tmp_path, mutate=_box_outside)
    captioner = RecordingCaptioner()
    with pytest.raises(DataError, match=rf"^{ann}: 1 bad sample\(s\): images entry 3, sample 3: "
                                        rf"bbox \[70, 3, 10, 10\] lies entirely outside the 64x48 image"):
        vg.evaluate(config(tmp_path, ann, images), captioner)
    assert captioner.asked == []


def test_skip_bad_leaves_out_a_box_outside_the_image(tmp_path):
    ann, images = write_test_file(tmp_path, mutate=_box_outside)
    samples, skipped = vg.load_vg_test(ann, images, skip_bad=True)
    assert [s.sample_id for s in samples] == [1, 2, 4, 5, 6] and len(skipped) == 1


def test_a_box_is_checked_against_the_image_file_when_the_entry_has_no_size(tmp_path):
    def no_size(data):
        _box_outside(data)
        for entry in data["images"]:
            del entry["width"], entry["height"]
    assert_load_refused(tmp_path, no_size, r"sample 3: bbox \[70, 3, 10, 10\] lies entirely outside the 64x48 image")


def test_a_width_given_as_a_string_is_an_error_naming_the_field(tmp_path):
    def string_width(data):
        data["images"][1]["width"] = "64"
    assert_load_refused(tmp_path, string_width, r"images entry 2, sample 2: images field 'width' must be a positive number "
                                        r"\(got str '64'\)")


def test_a_caption_that_is_not_a_string_is_an_error_naming_the_field_and_type(tmp_path):
    def number_caption(data):
        data["annotations"][3]["caption"] = 7
    assert_load_refused(tmp_path, number_caption, r"sample 4: annotation field 'caption' must be a string \(got int 7\)")


def test_skip_bad_counts_and_leaves_out_bad_samples(tmp_path):
    def two_bad(data):
        data["annotations"][1]["caption"] = ""
        data["images"][4]["file_name"] = "gone.jpg"
    ann, images = write_test_file(tmp_path, mutate=two_bad)
    samples, skipped = vg.load_vg_test(ann, images, skip_bad=True)
    assert [s.sample_id for s in samples] == [1, 3, 4, 6]
    assert len(skipped) == 2


def test_bad_input_fails_before_any_generation(tmp_path):
    def empty(data):
        data["annotations"][5]["caption"] = ""
    ann, images = write_test_file(tmp_path, mutate=empty)
    captioner = RecordingCaptioner()
    with pytest.raises(DataError):
        vg.evaluate(config(tmp_path, ann, images), captioner)
    assert captioner.asked == []


def test_killed_run_resumes_and_each_sample_is_predicted_once(tmp_path):
    ann, images = write_test_file(tmp_path)
    cfg = config(tmp_path, ann, images)
    with pytest.raises(KeyboardInterrupt):
        vg.evaluate(cfg, RecordingCaptioner(die_after_batches=2))
    partial = cfg.out / vg.PARTIAL_NAME
    with open(partial, "a") as fh:  # a kill in the middle of a write leaves half a line
        fh.write('{"id": "5", "capt')
    second = RecordingCaptioner()
    vg.evaluate(cfg, second)
    assert [r.boxes for r in second.asked] == [[[2.0, 3.0, 22.0, 13.0]]] * 2
    assert [r.image for r in second.asked] == [images / "a.jpg", images / "b.jpg"]  # samples 5 and 6 only
    preds = json.loads((cfg.out / "predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(l) for l in partial.read_text().splitlines()]
    assert "store_metadata" in lines[0]
    assert sorted(r["id"] for r in lines[1:]) == ["1", "2", "3", "4", "5", "6"]


def test_finished_run_rerun_asks_the_model_nothing(tmp_path):
    ann, images = write_test_file(tmp_path, n=2)
    cfg = config(tmp_path, ann, images)
    vg.evaluate(cfg, RecordingCaptioner())
    again = RecordingCaptioner()
    vg.evaluate(cfg, again)
    assert again.asked == []


def test_prompt_has_the_gpt4roi_preamble_and_one_region():
    assert vg.DEFAULT_PROMPT == ("The <image> provides an overview of the picture.\n"
                                 "Can you give a description of the region mentioned by region1 <bbox>?")


def test_metrics_files_and_attribute_accuracy_with_chance(tmp_path):
    ann, images = write_test_file(tmp_path)
    summary = vg.evaluate(config(tmp_path, ann, images), RecordingCaptioner())
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert metrics["SPICE"] is None
    # every answer says "red circle": right for samples 1 and 3 only; red+circle is also the modal pair (2 of 6)
    assert summary["attribute_accuracy"]["accuracy"] == pytest.approx(2 / 6)
    assert summary["attribute_accuracy"]["chance"] == pytest.approx(2 / 6)
    assert "CIDEr" in (out / "metrics.txt").read_text()


def test_attribute_match_needs_whole_words_for_both_colour_and_kind():
    s = vg.VGSample(1, Path("x.jpg"), [0, 0, 1, 1], "ref", {"colour": "red", "kind": "square"})
    t = vg.VGSample(2, Path("x.jpg"), [0, 0, 1, 1], "ref", {"colour": "red", "kind": "square"})
    acc = vg.attribute_accuracy([s, t], {1: "A Red square.", 2: "a reddish squares"})
    assert acc["accuracy"] == 0.5


def test_attribute_match_takes_the_caption_subject_not_a_mentioned_neighbour():
    s = vg.VGSample(1, Path("x.jpg"), [0, 0, 1, 1], "ref", {"colour": "red", "kind": "square"})
    t = vg.VGSample(2, Path("x.jpg"), [0, 0, 1, 1], "ref", {"colour": "blue", "kind": "circle"})
    preds = {1: "A blue circle sits left of a red square.", 2: "A blue circle sits left of a red square."}
    acc = vg.attribute_accuracy([s, t], preds)
    assert acc["accuracy"] == 0.5


def test_each_attribute_is_scored_alone_against_its_most_common_value():
    attrs = [{"colour": "red", "kind": "square", "position": "upper left"},
             {"colour": "red", "kind": "circle", "position": "upper middle"},
             {"colour": "blue", "kind": "circle", "position": "lower left"},
             {"colour": "red", "kind": "circle", "position": "lower left"}]
    samples = [vg.VGSample(i, Path("x.jpg"), [0, 0, 1, 1], "ref", a) for i, a in enumerate(attrs, 1)]
    preds = {1: "A red circle in the upper left, left of a blue square.",  # colour, position right; kind wrong
             2: "A red circle in the lower left.",                          # colour, kind right; position wrong
             3: "A red circle in the lower left.",                          # kind, position right
             4: "Nothing here."}                                            # no attribute named
    per = vg.attribute_accuracy(samples, preds)["per_attribute"]
    assert per["colour"] == {"accuracy": 0.5, "chance": 0.75, "values": 2}
    assert per["kind"] == {"accuracy": 0.5, "chance": 0.75, "values": 2}
    assert per["position"] == {"accuracy": 0.5, "chance": 0.5, "values": 3}


def test_shards_partition_samples_and_merge_scores_all(tmp_path):
    ann, images = write_test_file(tmp_path)
    seen = []
    for i in range(3):
        cap = RecordingCaptioner()
        assert vg.evaluate(config(tmp_path, ann, images, shard_id=i, num_shards=3), cap) is None
        seen.extend(r.image for r in cap.asked)
    assert len(seen) == 6
    rc = vg.main(["merge", "--annotations", str(ann), "--out", str(tmp_path / "out"), "--num-shards", "3"])
    assert rc == 0
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in preds) == [1, 2, 3, 4, 5, 6]


def test_merge_with_a_missing_shard_names_it(tmp_path):
    ann, images = write_test_file(tmp_path)
    vg.evaluate(config(tmp_path, ann, images, shard_id=0, num_shards=2), RecordingCaptioner())
    with pytest.raises(DataError, match="shard 1 of 2"):
        vg.merge_shards(tmp_path / "out", 2)


def test_prediction_store_never_duplicates_an_id(tmp_path):
    store = PredictionStore(tmp_path / "p.jsonl")
    store.append([("1", {"caption": "a"}), ("1", {"caption": "b"})])
    store.append([("1", {"caption": "c"})])
    assert PredictionStore(tmp_path / "p.jsonl").records["1"]["caption"] == "a"
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 1


def test_cli_bad_file_prints_one_line_and_exits_2(tmp_path):
    def empty(data):
        data["annotations"][0]["caption"] = ""
    ann, images = write_test_file(tmp_path, mutate=empty)
    proc = run_module("eval.vg", "--annotations", str(ann), "--image-root", str(images), "--out", str(tmp_path / "out"),
                      "--model", str(tmp_path / "nomodel"), process=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "sample 1" in proc.stderr


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random tiny model and a synthetic VG test file (the real producers, run as a user would)."""
    pytest.importorskip("quickstart.tiny_model", reason="the tiny-model factory is not in this checkout")
    pytest.importorskip("data_converters.synthetic", reason="the synthetic data generator is not in this checkout")
    base = tmp_path_factory.mktemp("tiny_vg")
    for cmd in (["quickstart.tiny_model", "--out", str(base / "model")],
                ["data_converters.synthetic", "--out", str(base / "syn"), "--train-images", "1", "--val-images", "2"]):
        proc = run_module(*cmd)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def run_cli(base, out, process=True):
    """``python -m eval.vg`` on the tiny model: started as a process, or run in this one."""
    return run_module("eval.vg", "--model", str(base / "model"),
                      "--annotations", str(base / "syn" / "annotations" / "test_caption.json"),
                      "--image-root", str(base / "syn"), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "6",
                      process=process, timeout=300)


def test_tiny_model_end_to_end_and_interrupted_rerun_gives_the_same_predictions(tiny_setup, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(tiny_setup, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CIDEr" in proc.stdout and "attribute accuracy" in proc.stdout
    full = json.loads((out / "predictions.json").read_text())
    partial = out / vg.PARTIAL_NAME
    kept = partial.read_text().splitlines()[:3]
    partial.write_text("\n".join(kept) + '\n{"id": "4", "cap')  # as a kill during the 2nd batch's write leaves it
    (out / "predictions.json").unlink()
    proc = run_cli(tiny_setup, out, process=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "predictions.json").read_text()) == full
    ids = [json.loads(l)["id"] for l in partial.read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == len(full)


def test_without_java_predictions_are_written_and_score_only_scores_them_later_without_a_model(tmp_path, monkeypatch, capsys):
    from eval import caption_metrics

    ann, images = write_test_file(tmp_path)
    out = tmp_path / "out"
    real_which = caption_metrics.shutil.which
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None if name == "java" else real_which(name))
    summary = vg.evaluate(config(tmp_path, ann, images), RecordingCaptioner())
    assert summary["metrics"] is None and "java" in summary["scoring_note"]
    assert len(json.loads((out / "predictions.json").read_text())) == 6
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    # Any machine with Java: no --model, no --image-root.
    assert vg.main(["--score-only", "--annotations", str(ann), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["CIDEr"] is not None
    assert "CIDEr" in capsys.readouterr().out


def test_without_java_the_cli_says_in_one_line_how_to_score_later(tmp_path, monkeypatch, capsys):
    from eval import caption_metrics

    ann, images = write_test_file(tmp_path)
    out = tmp_path / "out"
    vg.evaluate(config(tmp_path, ann, images), RecordingCaptioner())  # predictions stored and scored
    capsys.readouterr()
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    assert vg.main(["--annotations", str(ann), "--image-root", str(images), "--out", str(out), "--merge"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "--score-only" in printed[0] and "java" in printed[0], printed
    assert not (out / "metrics.json").exists(), "scores of earlier predictions must not be left beside new ones"


def test_score_only_that_cannot_score_fails_in_one_line_and_keeps_the_predictions(tmp_path, monkeypatch):
    from eval import caption_metrics

    ann, images = write_test_file(tmp_path)
    out = tmp_path / "out"
    vg.evaluate(config(tmp_path, ann, images), RecordingCaptioner())
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^--score-only: scoring needs .*java.*predictions\.json$"):
        vg.main(["--score-only", "--annotations", str(ann), "--out", str(out)])
    assert len(json.loads((out / "predictions.json").read_text())) == 6


def test_cli_with_a_missing_model_exits_2_in_one_line_even_when_old_predictions_are_stored(tmp_path):
    ann, images = write_test_file(tmp_path)
    vg.evaluate(config(tmp_path, ann, images), RecordingCaptioner())
    proc = run_module("eval.vg", "--annotations", str(ann), "--image-root", str(images),
                      "--out", str(tmp_path / "out"), "--model", str(tmp_path / "does_not_exist"))
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip() == f"error: --model {tmp_path / 'does_not_exist'}: directory not found"
    assert "CIDEr" not in proc.stdout
