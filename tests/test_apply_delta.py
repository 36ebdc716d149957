"""python -m gpt4roi_sft.model.apply_delta: GPT4RoI's delta over LLaMA, shard by shard, on tiny hand-made dirs.

The base is a bare LLaMA-like model (a SentencePiece vocabulary of V pieces, no added tokens); the delta holds
V + 6 embedding rows, GPT4RoI's projector and region weights and its tokenizer files as transformers 4.28 saved
them, as GPT4RoI's ``make_delta.py`` writes it. Both are written sharded with an index, once as safetensors and
once as ``.bin``.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt4roi_reference import (GPT4ROI_TOKENS, slow_gpt4roi_tokens, train_llama_sentencepiece, write_tiny_gpt4roi,
                               write_transformers_428_tokenizer)

from conftest import run_module


def _save_sharded(state: dict, out: Path, fmt: str, shards: int = 3) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        part = {k: state[k].contiguous() for k in keys[s * per:(s + 1) * per]}
        if fmt == "safetensors":
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, out / name)
        else:
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, out / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _read_all(path: Path) -> dict:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny GPT4RoI target (fp16, as released) split into a base and a delta the way make_delta.py does."""
    from gpt4roi_reference import read_checkpoint

    from gpt4roi_sft.model.gpt4roi_tokenizer import build_gpt4roi_tokenizer

    root = tmp_path_factory.mktemp("release")
    sp_model = train_llama_sentencepiece(root / "sp")
    target_dir = write_tiny_gpt4roi(root / "target", seed=1, tokenizer=build_gpt4roi_tokenizer(str(root / "sp")))
    target = {k: v.half() for k, v in read_checkpoint(target_dir).items()}
    rows = target["model.embed_tokens.weight"].shape[0]
    gen = torch.Generator().manual_seed(2)
    base = {k: torch.randn(v.shape, generator=gen).half() for k, v in target.items()
            if not k.startswith(("model.mm_projector.", "model.spi_module."))}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        base[key] = base[key][: rows - 6].clone()
    base["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8).half()  # old checkpoints carry it
    delta = {}
    for k, v in target.items():
        d = v.clone()
        if k in base:
            b = base[k]
            d[: b.shape[0]] -= b
        delta[k] = d
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8).half()
    # What GPT4RoI's apply_delta.py computes: param.data += base (first rows only for the vocabulary matrices).
    expected = {}
    for k, d in delta.items():
        if "inv_freq" in k:
            continue
        e = d.clone()
        if k in base:
            e[: base[k].shape[0]] += base[k]
        expected[k] = e
    config = json.loads((Path(target_dir) / "config.json").read_text())
    return {"root": root, "base": base, "delta": delta, "expected": expected, "config": config, "rows": rows,
            "clip": config["mm_vision_tower"], "sp_model": sp_model}


def _write_pair(release, tmp_path, base_fmt, delta_fmt, delta_tokenizer=True, base_pad=None):
    base_dir, delta_dir = tmp_path / "llama", tmp_path / "delta"
    _save_sharded(release["base"], base_dir, base_fmt)
    write_transformers_428_tokenizer(base_dir, release["sp_model"], pad=base_pad, added=False)
    base_cfg = {k: v for k, v in release["config"].items() if not k.startswith("mm_")}
    base_cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=release["rows"] - 6)
    (base_dir / "config.json").write_text(json.dumps(base_cfg))
    _save_sharded(release["delta"], delta_dir, delta_fmt, shards=2)
    (delta_dir / "config.json").write_text(json.dumps(release["config"]))
    if delta_tokenizer:
        write_transformers_428_tokenizer(delta_dir, release["sp_model"])
    return base_dir, delta_dir


def _apply(base_dir, delta_dir, out, *extra, process=False):
    """``python -m gpt4roi_sft.model.apply_delta``, in this process unless ``process`` (one test starts it)."""
    return run_module("gpt4roi_sft.model.apply_delta", "--base", str(base_dir), "--delta", str(delta_dir), "--out", str(out),
                      *extra, process=process)


@pytest.mark.parametrize("base_fmt,delta_fmt", [("safetensors", "bin"), ("bin", "safetensors")])
def test_delta_plus_base_equals_gpt4roi_apply_delta(release, tmp_path, base_fmt, delta_fmt):
    base_dir, delta_dir = _write_pair(release, tmp_path, base_fmt, delta_fmt)
    proc = _apply(base_dir, delta_dir, tmp_path / "out", "--max-shard-size", "200KB", process=base_fmt == "bin")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = _read_all(tmp_path / "out")
    assert merged.keys() == release["expected"].keys()  # inv_freq buffers dropped
    for k, v in release["expected"].items():
        assert merged[k].dtype == torch.float16 and torch.equal(merged[k], v), k


def test_output_is_sharded_within_the_size_limit_with_an_index(release, tmp_path):
    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "bin")
    assert _apply(base_dir, delta_dir, tmp_path / "out", "--max-shard-size", "200KB").returncode == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    biggest_tensor = max(v.numel() * v.element_size() for v in release["expected"].values())
    for name in shards:
        tensors = load_file(tmp_path / "out" / name)
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        assert size <= max(200 * 1024, biggest_tensor)
        assert all(index["weight_map"][k] == name for k in tensors)


def test_tokenizer_has_gpt4roi_six_tokens_even_when_the_base_names_a_pad_token(release, tmp_path):
    # The delta's tokenizer is missing: rebuilt from a base whose tokenizer already has a pad token, which
    # made GPT4RoI's own training script add five tokens for six rows (32005 vs 32006).
    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "bin", delta_tokenizer=False, base_pad="<unk>")
    proc = _apply(base_dir, delta_dir, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    rows = release["rows"]
    assert len(tok) == rows and tok.pad_token == "[PAD]"
    assert tok.convert_tokens_to_ids(list(GPT4ROI_TOKENS)) == list(range(rows - 6, rows))


GPT4ROI_TEXTS = [
    "A chat between a curious human and an artificial intelligence assistant.\n\n### Human: The <im_start>"
    "<im_patch><im_patch><im_end> provides an overview of the picture.\nCan you give a description of the region "
    "mentioned by `region1 <bbox>`?\n### ",
    "Could you please give me a detailed description of these areas region1 <bbox>,region2 <bbox>,?",
    "such as <bbox> may feature a cat,<bbox> may feature a dog,.\n\nWhat is the dog doing?",
    "Given region1 <bbox>,region2 <bbox>,Why is person at region2 here?\n### Assistant: Because 12 .\n### ",
]


def test_tokenizer_tokenizes_as_gpt4roi_training_did(release, tmp_path):
    from transformers import AutoTokenizer

    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "bin")
    assert _apply(base_dir, delta_dir, tmp_path / "out").returncode == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    tok.save_pretrained(tmp_path / "again")  # the behaviour survives being saved and loaded again
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    for text in GPT4ROI_TEXTS:
        expected = slow_gpt4roi_tokens(release["sp_model"], text)
        assert tok.convert_ids_to_tokens(tok(text).input_ids) == expected
        assert again.convert_ids_to_tokens(again(text).input_ids) == expected


def test_directory_with_gpt4roi_own_tokenizer_files_loads_with_the_training_tokenizer(release, tmp_path):

    from gpt4roi_sft.model.loading import load_processor

    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "bin")
    assert _apply(base_dir, delta_dir, tmp_path / "out", "--vision-tower", release["clip"]).returncode == 0
    merged = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (merged / name).unlink(missing_ok=True)
    write_transformers_428_tokenizer(merged, release["sp_model"])  # as GPT4RoI's own apply_delta.py leaves it
    tok = load_processor(str(merged)).tokenizer
    for text in GPT4ROI_TEXTS:
        assert tok.convert_ids_to_tokens(tok(text).input_ids) == slow_gpt4roi_tokens(release["sp_model"], text)


def test_merged_directory_loads_in_gpt4roi_layout(release, tmp_path):
    from gpt4roi_sft.model.loading import load_model

    base_dir, delta_dir = _write_pair(release, tmp_path, "bin", "safetensors")
    assert _apply(base_dir, delta_dir, tmp_path / "out", "--vision-tower", release["clip"]).returncode == 0
    model, processor = load_model(str(tmp_path / "out"))
    assert processor.image_layout == "im_start_end"
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == release["rows"]
    torch.testing.assert_close(model.region_encoder.to_llm.weight,
                               release["expected"]["model.spi_module.roi_align.updims.weight"].float())


def test_a_base_weight_missing_from_the_delta_is_named(release, tmp_path):
    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "safetensors")
    state = release["base"] | {"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2).half()}
    _save_sharded(state, base_dir, "safetensors")
    proc = _apply(base_dir, delta_dir, tmp_path / "out")
    assert proc.returncode == 2
    assert "model.layers.9.mlp.up_proj.weight" in proc.stderr and "not in the delta" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_base_of_another_shape_is_refused(release, tmp_path):
    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "safetensors")
    state = dict(release["base"])
    state["model.norm.weight"] = torch.zeros(3).half()
    _save_sharded(state, base_dir, "safetensors")
    proc = _apply(base_dir, delta_dir, tmp_path / "out")
    assert proc.returncode == 2 and "model.norm.weight" in proc.stderr and "does not fit" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_output_directory_is_refused(release, tmp_path):
    base_dir, delta_dir = _write_pair(release, tmp_path, "safetensors", "bin")
    (tmp_path / "out").mkdir()
    proc = _apply(base_dir, delta_dir, tmp_path / "out")
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert not os.listdir(tmp_path / "out")
