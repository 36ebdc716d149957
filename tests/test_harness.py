"""eval.harness and eval.prediction_store: what every evaluation harness shares."""

import argparse
import json

import pytest

from eval import harness, vipbench
from eval.prediction_store import PredictionStore
from data_converters.synthetic_vipbench import build_fixture
from gpt4roi_sft.errors import ConfigError, DataError


def test_store_writes_its_metadata_first_and_reads_it_back(tmp_path):
    path = tmp_path / "p.jsonl"
    PredictionStore(path, metadata={"model": "m1", "max_new_tokens": 8}).append([("1", {"caption": "a"})])
    assert json.loads(path.read_text().splitlines()[0]) == {"store_metadata": {"model": "m1", "max_new_tokens": 8}}
    again = PredictionStore(path)
    assert again.metadata == {"model": "m1", "max_new_tokens": 8} and list(again.records) == ["1"]


def test_store_refuses_to_resume_with_other_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    PredictionStore(path, metadata={"model": "m1"}).append([("1", {"caption": "a"})])
    PredictionStore(path, metadata={"model": "m1"})
    with pytest.raises(DataError, match="p.jsonl: written by another setup"):
        PredictionStore(path, metadata={"model": "m2"})


def test_store_without_a_header_cannot_be_vouched_for(tmp_path):
    path = tmp_path / "p.jsonl"
    PredictionStore(path).append([("1", {"caption": "a"})])
    with pytest.raises(DataError, match="another setup"):
        PredictionStore(path, metadata={"model": "m1"})


def test_shard_stores_have_their_own_files(tmp_path):
    assert harness.store_path(tmp_path, "predictions.partial.jsonl") == tmp_path / "predictions.partial.jsonl"
    assert (harness.store_path(tmp_path, "predictions.partial.jsonl", 1, 3)
            == tmp_path / "shards" / "predictions.shard-001-of-003.partial.jsonl")


def test_shard_id_outside_the_shard_count_is_a_config_error():
    with pytest.raises(ConfigError, match="--shard-id 3 --num-shards 3"):
        harness.shard(list(range(9)), 3, 3)


def test_command_line_options_become_the_config_fields(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    harness.add_model_args(parser, batch_size=4, max_new_tokens=32)
    harness.add_shard_args(parser)
    args = parser.parse_args(harness.merge_word_to_flag(
        ["merge", "--out", "o", "--model", "m", "--do-sample", "--temperature", "0.7", "--num-shards", "2"]))
    kwargs = harness.config_kwargs(args)
    assert args.merge and (kwargs["batch_size"], kwargs["num_shards"], str(kwargs["model"])) == (4, 2, "m")
    d = kwargs["decode"]
    assert (d.max_new_tokens, d.do_sample, d.temperature, d.strip_prefix) == (32, True, 0.7, False)


def test_generation_without_a_model_is_a_config_error_only_when_something_is_left(tmp_path):
    captioner = harness.captioner_for(harness.HarnessConfig(out=tmp_path))
    store = PredictionStore(tmp_path / "p.jsonl")
    store.append([("a", {"text": "done"})])
    kw = dict(key=str, request=lambda it: None, payload=lambda it, r, a: {"text": a}, batch_size=2, desc="t")
    assert harness.generate_missing(["a"], store, captioner, **kw) == 0
    with pytest.raises(ConfigError, match="--model is required"):
        harness.generate_missing(["a", "b"], store, captioner, **kw)


class CountingCaptioner:
    def __init__(self):
        self.asked = 0

    def __call__(self, requests):
        self.asked += len(requests)
        return [f"answer {i}" for i in range(len(requests))]


def test_vipbench_shards_partition_the_questions_and_merge_answers_all(tmp_path):
    build_fixture(tmp_path / "vip", num_questions=8, seed=1)
    asked = []
    for i in range(3):
        captioner = CountingCaptioner()
        config = vipbench.VipBenchConfig(data=tmp_path / "vip", split="bbox", out=tmp_path / "out", shard_id=i,
                                         num_shards=3)
        assert vipbench.run(config, captioner) is None
        asked.append(captioner.asked)
    assert asked == [3, 3, 2]
    assert vipbench.main(["merge", "--data", str(tmp_path / "vip"), "--split", "bbox", "--out", str(tmp_path / "out"),
                          "--num-shards", "3"]) == 0
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 8


def test_vipbench_merge_with_a_missing_shard_names_it(tmp_path):
    build_fixture(tmp_path / "vip", num_questions=4, seed=1)
    config = vipbench.VipBenchConfig(data=tmp_path / "vip", split="bbox", out=tmp_path / "out", num_shards=2)
    vipbench.run(config, CountingCaptioner())
    with pytest.raises(DataError, match="shard 1 of 2"):
        vipbench.main(["merge", "--data", str(tmp_path / "vip"), "--split", "bbox", "--out", str(tmp_path / "out"),
                       "--num-shards", "2"])


# ------------------------------------------------------------------ results tied to what produced them
def fake_model(path, value: float = 0.0, rows: int = 4):
    """A model directory with a config and one safetensors file (what the fingerprint reads)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt4roi"}))
    save_file({"embed": torch.full((rows, 8), value), "head": torch.zeros(3, 8)}, str(path / "model.safetensors"))
    return path


class EchoCaptioner:
    def __call__(self, requests):
        return ["a red circle"] * len(requests)


@pytest.fixture
def no_scoring(monkeypatch):
    """Skip pycocoevalcap (Java, seconds per call): these tests are about which answers are kept."""
    from eval import vg

    monkeypatch.setattr(vg, "scoring_unavailable_reason", lambda: "scoring skipped in this test")


def vg_config(tmp_path, **kw):
    from eval import vg
    from tests.test_eval_vg import write_test_file

    ann, images = write_test_file(tmp_path)
    return vg.VGEvalConfig(annotations=ann, image_root=images, out=tmp_path / "out", batch_size=2, **kw)


def test_weights_fingerprint_changes_with_trained_values_but_not_with_a_copy_or_a_touch(tmp_path):
    import os
    import shutil

    from gpt4roi_sft.provenance import weights_fingerprint

    a = weights_fingerprint(fake_model(tmp_path / "a", 0.0))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    os.utime(tmp_path / "copy" / "model.safetensors", (1, 1))
    assert weights_fingerprint(tmp_path / "copy") == a
    assert weights_fingerprint(fake_model(tmp_path / "retrained", 0.5)) != a
    assert weights_fingerprint(fake_model(tmp_path / "new_rows", 0.0, rows=5)) != a


def test_a_new_token_row_at_the_end_of_a_large_embedding_changes_the_fingerprint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from gpt4roi_sft.provenance import weights_fingerprint

    embed = torch.zeros(4096, 8)
    for name in ("before", "after"):
        (tmp_path / name).mkdir()
        save_file({"embed": embed}, str(tmp_path / name / "model.safetensors"))
        embed = embed.clone()
        embed[-1] = 1.0
    assert weights_fingerprint(tmp_path / "before") != weights_fingerprint(tmp_path / "after")


def test_resuming_with_another_models_weights_is_an_error_naming_the_model(tmp_path, no_scoring):
    from eval import vg

    cfg = vg_config(tmp_path, model=fake_model(tmp_path / "m1", 0.0))
    vg.evaluate(cfg, EchoCaptioner())
    cfg.model = fake_model(tmp_path / "m2", 1.0)
    with pytest.raises(DataError, match=r"predictions.partial.jsonl: written by another setup \(changed model: .*--overwrite"):
        vg.evaluate(cfg, EchoCaptioner())


def test_overwrite_starts_afresh_when_the_setup_changed(tmp_path, no_scoring):
    from eval import vg

    cfg = vg_config(tmp_path, model=fake_model(tmp_path / "m1", 0.0))
    vg.evaluate(cfg, EchoCaptioner())
    cfg.model, cfg.overwrite = fake_model(tmp_path / "m2", 1.0), True
    asked = CountingCaptioner()
    vg.evaluate(cfg, asked)
    assert asked.asked == 6


def test_overwrite_keeps_the_results_of_the_same_setup(tmp_path, no_scoring):
    from eval import vg

    cfg = vg_config(tmp_path, model=fake_model(tmp_path / "m1", 0.0))
    vg.evaluate(cfg, EchoCaptioner())
    cfg.overwrite = True
    asked = CountingCaptioner()
    vg.evaluate(cfg, asked)
    assert asked.asked == 0


def test_other_decode_settings_are_named_in_the_refusal(tmp_path, no_scoring):
    from eval import vg
    from gpt4roi_sft.infer import DecodeSettings

    cfg = vg_config(tmp_path, model=fake_model(tmp_path / "m1"))
    vg.evaluate(cfg, EchoCaptioner())
    cfg.decode = DecodeSettings(max_new_tokens=9)
    with pytest.raises(DataError, match=r"changed decode.max_new_tokens: 64 -> 9"):
        vg.evaluate(cfg, EchoCaptioner())


def test_an_edited_test_file_is_named_in_the_refusal(tmp_path, no_scoring):
    from eval import vg

    cfg = vg_config(tmp_path, model=fake_model(tmp_path / "m1"))
    vg.evaluate(cfg, EchoCaptioner())
    data = json.loads(cfg.annotations.read_text())
    data["annotations"][0]["caption"] = "a different reference"
    cfg.annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"changed inputs.annotations"):
        vg.evaluate(cfg, EchoCaptioner())


def test_a_missing_model_is_an_error_even_when_every_prediction_is_stored(tmp_path, no_scoring):
    from eval import vg

    cfg = vg_config(tmp_path, model=fake_model(tmp_path / "m1"))
    vg.evaluate(cfg, EchoCaptioner())
    cfg.model = tmp_path / "does_not_exist"
    with pytest.raises(ConfigError, match=r"--model .*does_not_exist: directory not found"):
        vg.evaluate(cfg)


def test_summary_and_metrics_name_the_model_its_fingerprint_and_step(tmp_path):
    from eval import vg
    from gpt4roi_sft.provenance import weights_fingerprint

    model = fake_model(tmp_path / "m1")
    (model / "export_info.json").write_text(json.dumps({"step": 700, "checkpoint": "runs/x/checkpoints/step_700"}))
    cfg = vg_config(tmp_path, model=model)
    summary = vg.evaluate(cfg, EchoCaptioner())
    about = summary["provenance"]["produced_by"]["model"]
    assert (about["path"], about["fingerprint"], about["step"]) == (str(model), weights_fingerprint(model), 700)
    assert summary["provenance"]["setup"]["model"] == weights_fingerprint(model)
    assert f"model: {model} (weights {weights_fingerprint(model)}, exported at step 700)" in (cfg.out / "metrics.txt").read_text()


def test_merging_shards_of_two_models_is_refused(tmp_path, no_scoring):
    from eval import vg

    for i, value in enumerate((0.0, 1.0)):
        cfg = vg_config(tmp_path, model=fake_model(tmp_path / f"m{i}", value), shard_id=i, num_shards=2)
        vg.evaluate(cfg, EchoCaptioner())
    with pytest.raises(DataError, match=r"shard-001-of-002.*written by another setup"):
        vg.main(["merge", "--annotations", str(cfg.annotations), "--out", str(cfg.out), "--num-shards", "2"])


def test_vipbench_answers_of_another_model_are_refused(tmp_path):
    build_fixture(tmp_path / "vip", num_questions=4, seed=1)
    config = vipbench.VipBenchConfig(data=tmp_path / "vip", split="bbox", out=tmp_path / "out",
                                     model=fake_model(tmp_path / "m1", 0.0))
    vipbench.run(config, CountingCaptioner())
    config.model = fake_model(tmp_path / "m2", 1.0)
    with pytest.raises(DataError, match="predictions.jsonl: written by another setup"):
        vipbench.run(config, CountingCaptioner())


def test_grade_cache_of_another_setup_is_refused_and_overwrite_regrades(tmp_path):
    from eval.judge import Grade, GradeCache, JudgeItem

    item = JudgeItem("v1_0", "q", "q", "a", "p")
    cache = GradeCache(tmp_path / "grades.json", {"model": "m1"})
    cache.put(item, 0, "judge", Grade(1.0, "1.0", 1, "judge"))
    assert GradeCache(tmp_path / "grades.json", {"model": "m1"}).get(item, 0, "judge").score == 1.0
    with pytest.raises(DataError, match=r"grades.json: grades of another setup's answers \(changed model: \"m1\" -> \"m2\"\)"):
        GradeCache(tmp_path / "grades.json", {"model": "m2"})
    assert GradeCache(tmp_path / "grades.json", {"model": "m2"}, overwrite=True).get(item, 0, "judge") is None
