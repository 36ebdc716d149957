"""load_model: own dirs, llava-hf, LLM + CLIP, original LLaVA / GPT4RoI keys, weight errors, tiny CLI."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gpt4roi_sft.model.checkpoint_keys import convert_gpt4roi_state_dict
from gpt4roi_sft.model.loading import CheckpointError, load_model
from quickstart.tiny_model import build_tiny_model, tiny_tokenizer_corpus
from gpt4roi_sft.tokenization import train_llama_like_tokenizer

VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32)


def _text_config(vocab):
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_llama_like_tokenizer(tiny_tokenizer_corpus()[:200], vocab_size=300)


def _batch(processor, boxes=((0, 0, 30, 30),)):
    img = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    text = "<image> region1 <bbox> is" if boxes else "<image> a picture of"
    return processor(images=[img], texts=[text], boxes=[[list(b) for b in boxes]])


def test_save_then_load_gives_identical_logits(tiny_dir, tmp_path):
    model, proc = load_model(tiny_dir)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, proc2 = load_model(str(tmp_path))
    batch = _batch(proc)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**_batch(proc2)).logits)


def _rewrite_weights(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    state = load_file(f"{dst}/model.safetensors")
    edit(state)
    save_file(state, f"{dst}/model.safetensors")
    return str(dst)


def test_missing_weight_is_an_error_naming_it(tiny_dir, tmp_path):
    path = _rewrite_weights(tiny_dir, tmp_path / "m", lambda s: s.pop("region_encoder.to_llm.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight 'region_encoder\.to_llm\.weight'"):
        load_model(path)


def test_extra_weight_is_an_error_naming_it(tiny_dir, tmp_path):
    path = _rewrite_weights(tiny_dir, tmp_path / "m", lambda s: s.update({"stray.bias": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected weight 'stray\.bias'"):
        load_model(path)


def test_llava_hf_checkpoint_matches_transformers_llava_without_regions(tokenizer, tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=VISION, text_config=_text_config(len(tokenizer)), image_token_index=image_id,
                      image_seq_length=16)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, proc = load_model(str(tmp_path), attn_implementation="sdpa")
    batch = _batch(proc, boxes=())  # square image: pad and squash agree
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        ref = llava(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(ours[..., : ref.shape[-1]], ref, atol=1e-4, rtol=0)


def test_llm_plus_clip_dirs_add_missing_tokens_with_mean_embeddings(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "a", "picture", "region1", "is", "of"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="<pad>")
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "clip")
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in _text_config(len(plain)).items() if k != "model_type"}))
    llm.save_pretrained(tmp_path / "llm")
    plain.save_pretrained(tmp_path / "llm")
    model, proc = load_model(str(tmp_path / "llm"), vision_tower=str(tmp_path / "clip"))
    emb = model.get_input_embeddings().weight
    old = llm.get_input_embeddings().weight.shape[0]
    assert {proc.bbox_token_id, proc.image_token_id} == {old, old + 1}
    for tok_id in (proc.bbox_token_id, proc.image_token_id):
        torch.testing.assert_close(emb[tok_id], llm.get_input_embeddings().weight.mean(0))
    with torch.no_grad():
        assert model(**_batch(proc)).logits.isfinite().all()


def _gpt4roi_style_state(tiny_dir):
    """Our tiny weights renamed to GPT4RoI's released key layout (model.spi_module.*, model.mm_projector...)."""
    ours = load_file(f"{tiny_dir}/model.safetensors")
    rename = [("region_encoder.mlvl_fuse.", "model.spi_module.mlvl_fuse."),
              ("region_encoder.pconvs.", "model.spi_module.roi_align.pconvs."),
              ("region_encoder.flatten_linear.", "model.spi_module.roi_align.flatten_linear."),
              ("region_encoder.box_embed.", "model.spi_module.roi_align.pos_embedd."),
              ("region_encoder.to_llm.", "model.spi_module.roi_align.updims."),
              ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
              ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
              ("vision_tower.", "model.vision_tower.vision_model."),
              ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")]
    out = {}
    for k, v in ours.items():
        for a, b in rename:
            if k.startswith(a):
                out[b + k[len(a):]] = v
                break
    assert len(out) == len(ours)
    return ours, out


def test_gpt4roi_key_converter_maps_every_released_key_to_ours(tiny_dir):
    ours, theirs = _gpt4roi_style_state(tiny_dir)
    converted = convert_gpt4roi_state_dict(theirs)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_gpt4roi_converter_rejects_an_unknown_region_key():
    with pytest.raises(KeyError, match="model.spi_module.new_thing.weight"):
        convert_gpt4roi_state_dict({"model.spi_module.new_thing.weight": torch.zeros(1)})


def test_original_llava_format_directory_loads_with_a_clip_dir(tiny_dir, tmp_path):
    ours, theirs = _gpt4roi_style_state(tiny_dir)
    theirs = {k: v for k, v in theirs.items() if not k.startswith("model.vision_tower.")}
    ref_model, proc = load_model(tiny_dir)
    clip_dir = tmp_path / "clip"
    ref_model.vision_tower.save_pretrained(clip_dir)
    ckpt = tmp_path / "gpt4roi"
    ckpt.mkdir()
    save_file(theirs, ckpt / "model.safetensors")
    cfg = ref_model.config.text_config.to_dict()
    cfg.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(clip_dir),
               mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
               **{k: getattr(ref_model.config, k) for k in ("region_feature_layers", "region_hidden_size",
                                                           "roi_output_size", "region_fuse_rounds", "region_gn_groups")})
    (ckpt / "config.json").write_text(json.dumps(cfg))
    proc.tokenizer.save_pretrained(ckpt)
    model, proc2 = load_model(str(ckpt))
    assert torch.equal(model.region_encoder.to_llm.weight, ref_model.region_encoder.to_llm.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch(proc2)).logits, ref_model(**_batch(proc)).logits)


def test_tiny_cli_writes_a_directory_load_model_opens(tmp_path):
    rc = subprocess.run([sys.executable, "-m", "quickstart.tiny_model", "--out", str(tmp_path / "t"), "--seed", "1"],
                        capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    model, proc = load_model(str(tmp_path / "t"))
    assert model.config.num_image_tokens == 64 and proc.num_image_tokens == 64


def test_load_model_from_config_applies_the_recipe_dtype_and_attention(tiny_dir):
    from gpt4roi_sft.config import load_config
    from gpt4roi_sft.train.modes import load_model_from_config

    cfg = load_config(None, [f"model.path={tiny_dir}", "model.attn_implementation=eager"])
    model, processor = load_model_from_config(cfg, torch.bfloat16)
    assert model.config._attn_implementation == "eager"
    assert model.language_model.dtype == torch.bfloat16 and processor.num_image_tokens == 64
