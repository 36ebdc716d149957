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
