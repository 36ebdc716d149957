"""The training config: YAML + key=value overrides, strict keys and types, launch-time checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt4roi_sft.config import Config, load_config, parse_data_sources, validate_for_launch
from gpt4roi_sft.errors import ConfigError
from gpt4roi_sft.train.deepspeed_config import fill_auto_values

REPO = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def launchable_config(tmp_path, **sections) -> Config:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    overrides = [f"model.path={model}", f"data.train={data}", f"train.output_dir={tmp_path / 'out'}"]
    overrides += [f"{k}={v}" for k, v in sections.items()]
    return load_config(None, overrides)


def test_yaml_values_are_overridden_by_key_value_pairs(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  max_steps: 5\n  learning_rate: 0.001\nlora:\n  enabled: false\n")
    cfg = load_config(str(recipe), ["train.max_steps=20", "lora.enabled=true"])
    assert cfg.train.max_steps == 20
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.lora.enabled is True


def test_unknown_key_names_the_dotted_key(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  max_stepz: 5\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        load_config(str(recipe))


def test_duplicate_section_names_the_file_line_and_key(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  max_steps: 2\nlora:\n  enabled: false\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: line 5: duplicate key 'train' \(first given on line 1\)"):
        load_config(str(recipe))


def test_duplicate_key_inside_a_section_is_rejected(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  max_steps: 2\n  seed: 1\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: line 4: duplicate key 'max_steps'"):
        load_config(str(recipe))


def test_a_recipe_that_is_not_utf8_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"train:\n  max_steps: 2\n  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: line 3: not UTF-8 text \(byte 29: 0xe9\)"):
        load_config(str(recipe))


def test_unknown_override_section_is_rejected():
    with pytest.raises(ConfigError, match="trainn"):
        load_config(None, ["trainn.max_steps=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got str 'many'"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"lora\.enabled: expected true or false"):
        load_config(None, ["lora.enabled=3"])


def test_exponent_notation_learning_rate_is_a_number(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  learning_rate: 2e-5\n")
    assert load_config(str(recipe), ["train.weight_decay=1e-2"]).train.learning_rate == pytest.approx(2e-5)
    assert load_config(str(recipe), ["train.weight_decay=1e-2"]).train.weight_decay == pytest.approx(0.01)


def test_integer_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0


def test_choice_fields_list_the_allowed_values():
    with pytest.raises(ConfigError, match="model.freeze: must be one of none, stage1, stage2, llm"):
        load_config(None, ["model.freeze=everything"])


def test_partial_activation_checkpointing_needs_checkpointing_and_a_positive_interval():
    assert load_config(None, ["model.gradient_checkpointing=true", "model.checkpoint_every=2"]).model.checkpoint_every == 2
    with pytest.raises(ConfigError, match=r"model\.checkpoint_every=2 needs model\.gradient_checkpointing=true"):
        load_config(None, ["model.checkpoint_every=2"])
    with pytest.raises(ConfigError, match=r"model\.checkpoint_every: must be >= 1, got 0"):
        load_config(None, ["model.gradient_checkpointing=true", "model.checkpoint_every=0"])


def test_mixing_ratios_are_parsed_from_data_train():
    assert parse_data_sources("a.jsonl:0.7, b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert parse_data_sources("only.jsonl") == [("only.jsonl", 1.0)]
    with pytest.raises(ConfigError, match="positive"):
        parse_data_sources("a.jsonl:0")


def test_missing_data_file_is_named(tmp_path):
    cfg = launchable_config(tmp_path)
    cfg.data.train = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"data\.train: file not found: .*nope\.jsonl"):
        validate_for_launch(cfg)


def test_qlora_with_zero3_is_rejected_with_the_reason(tmp_path):
    cfg = launchable_config(
        tmp_path, **{"lora.enabled": "true", "lora.qlora": "true", "deepspeed.config": str(REPO / "ds_configs/zero3.json")}
    )
    with pytest.raises(ConfigError, match="ZeRO-3"):
        validate_for_launch(cfg)


def test_qlora_with_zero2_is_accepted(tmp_path):
    cfg = launchable_config(
        tmp_path, **{"lora.enabled": "true", "lora.qlora": "true", "deepspeed.config": str(REPO / "ds_configs/zero2.json")}
    )
    validate_for_launch(cfg)


def test_the_torch_engine_needs_no_deepspeed_json_and_refuses_what_only_deepspeed_does(tmp_path):
    validate_for_launch(launchable_config(tmp_path, **{"train.engine": "torch", "deepspeed.config": "missing.json",
                                                       "model.liger_kernel": "true"}))
    with pytest.raises(ConfigError, match="lora.qlora trains on train.engine=deepspeed only"):
        launchable_config(tmp_path, **{"train.engine": "torch", "lora.enabled": "true", "lora.qlora": "true"})
    with pytest.raises(ConfigError, match=r"deepspeed.overrides 'bf16.check_grad_overflow=false': train.engine=torch "
                                          r"runs without DeepSpeed, so it would change nothing"):
        launchable_config(tmp_path, **{"train.engine": "torch",
                                       "deepspeed.overrides": '["bf16.check_grad_overflow=false"]'})
    with pytest.raises(ConfigError, match="train.engine: must be one of deepspeed, torch, got 'fsdp'"):
        launchable_config(tmp_path, **{"train.engine": "fsdp"})


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_every_deepspeed_config_has_its_auto_values_filled(tmp_path, name):
    cfg = launchable_config(tmp_path, **{"train.micro_batch_size": 4, "train.gradient_accumulation_steps": 2})
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    filled = fill_auto_values(ds, cfg, world_size=2, hidden_size=64)
    assert filled["train_batch_size"] == 16
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(filled)


def test_deepspeed_overrides_set_nested_keys_with_yaml_values():
    from gpt4roi_sft.config import apply_deepspeed_overrides

    cfg = load_config(None, ["deepspeed.overrides=zero_optimization.overlap_comm=false,timers.throughput.enabled=false,"
                             "zero_optimization.reduce_bucket_size=5e8"])
    ds = apply_deepspeed_overrides({"zero_optimization": {"stage": 2, "overlap_comm": True}}, cfg.deepspeed.overrides)
    assert ds == {"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 5e8},
                  "timers": {"throughput": {"enabled": False}}}


@pytest.mark.parametrize("item", ["overlap_comm", "=true"])
def test_malformed_deepspeed_override_names_the_item(item):
    with pytest.raises(ConfigError, match=f"deepspeed.overrides: '{item}' must look like section.key=value"):
        load_config(None, [f"deepspeed.overrides=[{item}]"])


def test_override_that_stages_zero_3_counts_for_the_launch_checks(tmp_path):
    cfg = launchable_config(tmp_path, **{"model.liger_kernel": "true", "deepspeed.config": str(REPO / "ds_configs/zero2.json"),
                                         "deepspeed.overrides": "[zero_optimization.stage=3]"})
    with pytest.raises(ConfigError, match="model.liger_kernel with .*ZeRO-3"):
        validate_for_launch(cfg)


def test_token_budget_smaller_than_a_sample_is_rejected():
    with pytest.raises(ConfigError, match="data.pack_tokens: 1000 is less than data.max_length=2048"):
        load_config(None, ["data.pack_tokens=1000"])


def test_token_budget_implies_packing_and_rows_of_128():
    cfg = load_config(None, ["data.pack_tokens=8192"])
    assert cfg.data.packed and cfg.data.row_multiple == 128
    assert load_config(None, []).data.row_multiple == 1
    assert load_config(None, ["data.packing=true", "data.pad_to_multiple=256"]).data.row_multiple == 256


def test_unknown_compile_part_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model.compile: unknown part.*decoder_layers, region_encoder"):
        load_config(None, ["model.compile=decoder_layers,vision_tower"])


def test_zero_log_steps_is_rejected():
    with pytest.raises(ConfigError, match="train.log_steps: must be >= 1"):
        load_config(None, ["train.log_steps=0"])


def test_explicit_batch_size_that_disagrees_with_the_recipe_is_an_error(tmp_path):
    cfg = launchable_config(tmp_path, **{"train.micro_batch_size": 4})
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees"):
        fill_auto_values({"train_micro_batch_size_per_gpu": 8}, cfg, world_size=1, hidden_size=8)


def test_bad_config_cli_prints_one_line_and_exits_2_before_loading_anything(tmp_path):
    recipe = write_recipe(tmp_path, "train:\n  bogus: 1\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_sft.py"), "--config", str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "train.bogus" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_recipes_parse():
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(recipe))


def test_check_fails_when_the_image_root_holds_none_of_the_records_images(tmp_path):
    cfg = launchable_config(tmp_path)
    (tmp_path / "images" / "train2017").mkdir(parents=True)
    Path(cfg.data.train).write_text(json.dumps({"id": "a", "image": "train2017/000000000001.jpg"}) + "\n")
    cfg.data.image_root = str(tmp_path / "images")
    with pytest.raises(ConfigError, match=r"data\.image_root: .*train\.jsonl line 1 names image "
                                          r"'train2017/000000000001\.jpg', but .*images/train2017/000000000001\.jpg does not exist"):
        validate_for_launch(cfg)
    (tmp_path / "images" / "train2017" / "000000000001.jpg").write_bytes(b"")
    validate_for_launch(cfg)


def test_check_cli_names_the_missing_image_in_one_line(tmp_path):
    cfg = launchable_config(tmp_path)
    (tmp_path / "empty_root").mkdir()
    Path(cfg.data.train).write_text(json.dumps({"id": "a", "image": "x.jpg"}) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--check", f"model.path={cfg.model.path}",
                           f"data.train={cfg.data.train}", f"data.image_root={tmp_path / 'empty_root'}",
                           f"train.output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "config OK" not in proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "x.jpg" in proc.stderr, proc.stderr


def test_check_names_an_empty_training_file(tmp_path):
    from conftest import run_module

    cfg = launchable_config(tmp_path)
    (Path(cfg.model.path) / "config.json").write_text('{"model_type": "llama"}')  # checked without a processor
    Path(cfg.data.train).write_text("")
    proc = run_module("train_sft", "--check", f"model.path={cfg.model.path}", f"data.train={cfg.data.train}",
                      f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "config OK" not in proc.stdout
    assert proc.stderr.strip() == f"error: {cfg.data.train}: no records (the file is empty or holds only blank lines)"


def test_check_names_the_line_with_bad_utf8_in_one_line(tmp_path):
    from conftest import run_module

    cfg = launchable_config(tmp_path)
    (Path(cfg.model.path) / "config.json").write_text('{"model_type": "llama"}')  # checked without a processor
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    Path(cfg.data.train).write_bytes(good.encode() + b"\n" + good.replace('"yo"', '"\xff"').encode("latin-1") + b"\n")
    validate_for_launch(cfg)  # the quick image check leaves the line to the record scan
    proc = run_module("train_sft", "--check", f"model.path={cfg.model.path}", f"data.train={cfg.data.train}",
                      f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: {cfg.data.train} line 2: invalid JSON ('utf-8' codec can't decode")


def test_an_output_dir_that_is_a_file_is_named_at_launch(tmp_path):
    cfg = launchable_config(tmp_path)
    Path(cfg.train.output_dir).write_text("not a folder")
    with pytest.raises(ConfigError, match=r"train\.output_dir: .*out exists and is not a directory"):
        validate_for_launch(cfg)
