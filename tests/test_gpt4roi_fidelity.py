"""GPT4RoI's released checkpoints run here as in GPT4RoI's own code.

A tiny random checkpoint is written in GPT4RoI's released layout (key names, tokenizer additions, LLaVA-v0
config, sharded .bin files) and run twice: by ``tests/gpt4roi_reference.py``, a forward written after GPT4RoI's
code (its module order and arithmetic, mmcv's RoIAlign re-implemented from its kernel), and by this project
after ``python -m gpt4roi_sft.model.convert_gpt4roi`` with the ``gpt4roi_original`` template. Logits must agree
to 1e-4 (fp32) for images with 0, 1 and 15 boxes, through generation prompts and through a training record;
the evaluation harnesses must answer as GPT4RoI's own evaluation loop would (greedy here; the one difference
kept is where an answer is cut: at its first ``###``, where GPT4RoI removes only a trailing ``###``, which
differs when the model writes four or more ``#`` in a row). The last test changes one layout detail at a
time and shows that the comparison then fails.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_module
from gpt4roi_reference import ReferenceGPT4RoI, gpt4roi_image, write_tiny_gpt4roi

from gpt4roi_sft.constants import GPT4ROI_PREAMBLE, VG_EVAL_QUESTION
from gpt4roi_sft.conversation import TEMPLATES, build_prompt
from gpt4roi_sft.errors import DataError
from gpt4roi_sft.model.loading import load_model

TEMPLATE = "gpt4roi_original"
ATOL = 1e-4


def _image(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random picture with some texture (so a resize method shows in the pixels)."""
    rng = np.random.RandomState(seed)
    coarse = Image.fromarray((rng.rand(6, 8, 3) * 255).astype("uint8")).resize((w, h), Image.BILINEAR)
    arr = np.asarray(coarse, dtype=np.float32) + rng.randn(h, w, 3) * 20
    return Image.fromarray(arr.clip(0, 255).astype("uint8"))


def _boxes(n: int, w: int, h: int, seed: int) -> list:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        x1, y1 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
        out.append([float(x1), float(y1), float(min(w, x1 + rng.uniform(8, w * 0.5))),
                    float(min(h, y1 + rng.uniform(8, h * 0.5)))])
    out[0][2] = float(w)  # one box reaching the border
    return out


def _norm(boxes, w, h):
    return torch.tensor(boxes, dtype=torch.float32) / torch.tensor([w, h, w, h], dtype=torch.float32)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_tiny_gpt4roi(tmp_path_factory.mktemp("gpt4roi_release"), seed=0)


@pytest.fixture(scope="module")
def reference(released):
    return ReferenceGPT4RoI(released)


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "model"
    proc = run_module("gpt4roi_sft.model.convert_gpt4roi", "--checkpoint", released, "--out", str(out), process=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


@pytest.fixture(scope="module")
def ours(converted):
    return load_model(converted, attn_implementation="eager")


def _our_prompt_logits(model, processor, question: str, image, boxes):
    prompt = build_prompt(TEMPLATE, [{"from": "human", "value": question}], processor.tokenizer)
    batch = processor(images=[image], texts=[prompt], boxes=[boxes])
    with torch.no_grad():
        return batch["input_ids"], model(**batch).logits


def _reference_prompt_logits(reference, question: str, image, boxes):
    ids = reference.input_ids([{"from": "human", "value": question}])
    w, h = image.size
    return ids, reference(ids, gpt4roi_image(image)[None], [_norm(boxes, w, h)] if boxes else None)


def _assert_same(ours_out, ref_out):
    (ids, logits), (ref_ids, ref_logits) = ours_out, ref_out
    assert ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_converted_checkpoint_keeps_gpt4roi_vocabulary_and_layout(ours, released):
    model, processor = ours
    tok = processor.tokenizer
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == model.config.text_config.vocab_size
    base = len(tok) - 6
    ids = tok.convert_tokens_to_ids(["[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>"])
    assert ids == list(range(base, base + 6))
    assert "<image>" not in tok.get_vocab()
    assert processor.image_layout == "im_start_end" and processor.image_transform.resize_mode == "clip_squash"
    assert model.config.region_feature_layers == [1, 4, 7, 10]  # hidden_states[-2::-3] reversed, last 4, of 12


def test_image_without_boxes_gives_gpt4roi_logits(ours, reference):
    image = _image(200, 150, 1)
    question = GPT4ROI_PREAMBLE + "What is in the picture?"
    _assert_same(_our_prompt_logits(*ours, question, image, []), _reference_prompt_logits(reference, question, image, []))


def test_one_box_vg_prompt_gives_gpt4roi_logits(ours, reference):
    image, boxes = _image(131, 97, 2), _boxes(1, 131, 97, 2)
    question = GPT4ROI_PREAMBLE + VG_EVAL_QUESTION
    _assert_same(_our_prompt_logits(*ours, question, image, boxes),
                 _reference_prompt_logits(reference, question, image, boxes))


def test_released_directory_loads_directly_with_the_same_logits(released, reference):
    model, processor = load_model(released, attn_implementation="eager")
    image, boxes = _image(96, 128, 3), _boxes(2, 96, 128, 3)
    question = GPT4ROI_PREAMBLE + "Is region1 <bbox> left of region2 <bbox>?"
    _assert_same(_our_prompt_logits(model, processor, question, image, boxes),
                 _reference_prompt_logits(reference, question, image, boxes))


def test_fifteen_region_training_record_gives_gpt4roi_logits(ours, reference, tmp_path):
    from data_converters.templates import GPT4ROI_VG
    from gpt4roi_sft.data.collator import PaddingCollator
    from gpt4roi_sft.data.dataset import ConversationDataset

    model, processor = ours
    w, h = 320, 240
    image, boxes = _image(w, h, 4), _boxes(15, w, h, 4)
    image.save(tmp_path / "img.png")
    conversation = []
    for i in range(15):
        question = GPT4ROI_VG[i].replace("<spi_descript>", f"region{i + 1} <bbox>")
        conversation += [{"from": "human", "value": (GPT4ROI_PREAMBLE if i == 0 else "") + question},
                         {"from": "gpt", "value": f"A red square number {i}."}]
    record = {"id": "vg/1/d0", "image": "img.png", "width": w, "height": h, "regions": [{"bbox": b} for b in boxes],
              "conversations": conversation, "source": "vg"}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    dataset = ConversationDataset(str(tmp_path / "train.jsonl"), str(tmp_path), processor.tokenizer,
                                  processor.image_transform, processor.image_token_id, processor.num_image_tokens,
                                  template=TEMPLATE, max_length=4096, image_layout=processor.image_layout)
    batch = PaddingCollator(processor.tokenizer.pad_token_id, padding_side="right")([dataset[0]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], boxes=batch["boxes"],
                       attention_mask=batch["attention_mask"]).logits
    ref_ids = reference.input_ids(conversation)
    ref_logits = reference(ref_ids, gpt4roi_image(image)[None], [_norm(boxes, w, h)])
    _assert_same((batch["input_ids"], logits), (ref_ids, ref_logits))


# ------------------------------------------------------------------------------- evaluation harnesses
def _run(args, process=False, timeout=900):
    """``python -m <args>``: in this process, or started as one (``process``) where no other test starts it."""
    proc = run_module(*args, process=process, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _decode_args(model_dir):
    return ["--model", model_dir, "--template", TEMPLATE, "--max-new-tokens", "6", "--strip-prefix", "--batch-size", "2"]


def test_eval_vg_answers_as_gpt4roi_evaluation(converted, reference, tmp_path):
    images, annotations, samples = [], [], []
    for k, (w, h) in enumerate([(120, 90), (90, 120), (100, 100)]):
        name = f"vg_{k}.jpg"
        image = _image(w, h, 10 + k)
        image.save(tmp_path / name, quality=95)
        x1, y1, x2, y2 = _boxes(1, w, h, 10 + k)[0]
        bw, bh = x2 - x1, y2 - y1
        images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
        annotations.append({"id": k + 1, "image_id": k + 1, "bbox": [x1, y1, bw, bh], "caption": "a thing"})
        samples.append((Image.open(tmp_path / name), [x1, y1, x1 + bw, y1 + bh]))
    (tmp_path / "test_caption.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    question = GPT4ROI_PREAMBLE + "Can you give a description of the region mentioned by `region1 <bbox>`?"
    _run(["eval.vg", *_decode_args(converted), "--annotations", str(tmp_path / "test_caption.json"),
          "--image-root", str(tmp_path), "--out", str(tmp_path / "out"), "--prompt", question])
    predictions = {p["image_id"]: p["caption"] for p in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    for k, (image, box) in enumerate(samples):
        ids = reference.input_ids([{"from": "human", "value": question}])
        w, h = image.size
        expected = reference.generate_greedy(ids, gpt4roi_image(image)[None], [_norm([box], w, h)], 6,
                                            cut_at_first_stop=True)
        assert predictions[k + 1] == expected


def test_eval_vipbench_answers_as_gpt4roi_evaluation(converted, reference, tmp_path):
    _run(["data_converters.synthetic_vipbench", "--out", str(tmp_path / "vip"), "--questions", "3", "--seed", "0"])
    _run(["eval.vipbench", *_decode_args(converted), "--data", str(tmp_path / "vip"), "--split", "bbox",
          "--out", str(tmp_path / "out"), "--backtick-regions"], process=True)
    answers = json.loads((tmp_path / "out" / "results.json").read_text())
    stored = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    stored = [r for r in stored if "store_metadata" not in r]
    assert len(stored) == len(answers) == 3
    for record in stored:
        prompt, boxes = record["prompt"], record["boxes"]
        assert prompt.startswith(GPT4ROI_PREAMBLE) and "`region1 <bbox>`" in prompt  # GPT4RoI's model_vqa.py form
        image = _vip_source_image(tmp_path / "vip", record["question_id"])
        w, h = image.size
        ids = reference.input_ids([{"from": "human", "value": prompt}])
        expected = reference.generate_greedy(ids, gpt4roi_image(image.convert("RGB"))[None], [_norm(boxes, w, h)], 6,
                                            cut_at_first_stop=True)
        assert answers[record["id"]] == expected


def _vip_source_image(root: Path, question_id) -> Image.Image:
    from eval.vipbench import load_vipbench

    question = next(q for q in load_vipbench(root, "bbox", "region") if q.question_id == question_id)
    return Image.open(question.source_image)


# ------------------------------------------------------------------------------------- sensitivity
def _mutations():
    """(name, how to change one layout detail on our side, expected failure: 'differs' or an exception type)."""
    from gpt4roi_sft.conversation import VICUNA_SYSTEM
    from gpt4roi_sft.data import model_inputs
    from gpt4roi_sft.model import region_encoder

    def template(**change):
        def apply(mp, model, processor):
            mp.setitem(TEMPLATES, TEMPLATE, dataclasses.replace(TEMPLATES[TEMPLATE], **change))
        return apply

    def bare_patches(mp, model, processor):  # no <im_start>/<im_end> around the patches
        template(image_text="<im_patch>" * 256)(mp, model, processor)
        patch = processor.tokenizer.convert_tokens_to_ids("<im_patch>")
        mp.setattr(model_inputs.SampleEncoder, "_count_start_end_images",
                   lambda self, ids, where: int(list(ids).count(patch) > 0))

    def transform(**change):
        def apply(mp, model, processor):
            for k, v in change.items():
                mp.setattr(processor.image_transform, k, v)
        return apply

    def config(**change):
        def apply(mp, model, processor):
            for k, v in change.items():
                mp.setattr(model.config, k, v)
        return apply

    def xywh_boxes(mp, model, processor):
        original = processor.image_transform.map_boxes

        def mapped(boxes, w, h):
            b = original(boxes, w, h)
            return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1)
        mp.setattr(processor.image_transform, "map_boxes", mapped)

    def swapped_size(mp, model, processor):
        original = processor.image_transform.map_boxes
        mp.setattr(processor.image_transform, "map_boxes", lambda boxes, w, h: original(boxes, h, w).clamp(0, 1))

    def fuse_rounds(mp, model, processor):
        # (pytest's monkeypatch cannot swap a registered submodule back, so the ModuleList's own table is patched)
        convs = model.region_encoder.mlvl_fuse.fuse_convs
        mp.setattr(convs, "_modules", dict(list(convs._modules.items())[:4]))

    def swapped_shuffle(mp, model, processor):
        fuse = model.region_encoder.mlvl_fuse
        mix = type(fuse)._mix
        mp.setattr(fuse, "_mix", lambda feats, conv: mix(fuse, feats[::-1], conv)[::-1])

    def roi_align(**change):
        def apply(mp, model, processor):
            original = region_encoder.roi_align
            mp.setattr(region_encoder, "roi_align", lambda *a, **k: original(*a, **{**k, **change}))
        return apply

    def roi_align_scale(mp, factor):
        original = region_encoder.roi_align
        mp.setattr(region_encoder, "roi_align",
                   lambda *a, **k: original(*a, **{**k, "spatial_scale": k["spatial_scale"] * factor}))

    def reversed_region_tokens(mp, model, processor):
        forward = type(model.region_encoder).forward
        mp.setattr(model.region_encoder, "forward", lambda *a, **k: forward(model.region_encoder, *a, **k).flip(0))

    return [
        ("no <im_start>/<im_end> around the patches", bare_patches, "differs"),
        ("255 <im_patch> tokens", template(image_text="<im_start>" + "<im_patch>" * 255 + "<im_end>"), DataError),
        ("generation prompt ends with '### Assistant:'", template(generation_open=None), "differs"),
        ("another system text", template(system=VICUNA_SYSTEM), "differs"),
        ("bicubic squash instead of CLIP resize + bilinear", transform(resize_mode="squash"), "differs"),
        ("pad to square", transform(resize_mode="pad"), "differs"),
        ("ImageNet normalisation", transform(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), "differs"),
        ("boxes as xywh", xywh_boxes, "differs"),
        ("boxes normalised by height and width swapped", swapped_size, "differs"),
        ("RoIAlign frame 448 px instead of 224 (spatial scale halved)",
         lambda mp, m, p: roi_align_scale(mp, 0.5), "differs"),
        ("image features from the last layer", config(vision_feature_layer=-1), "differs"),
        ("region levels not reversed", config(region_feature_layers=[10, 7, 4, 1]), "differs"),
        ("region levels hidden_states[-1::-3]", config(region_feature_layers=[2, 5, 8, 11]), "differs"),
        ("4 shuffle rounds instead of 5", fuse_rounds, "differs"),
        ("shuffle sources swapped (top <-> down)", swapped_shuffle, "differs"),
        ("RoIAlign aligned=False", roi_align(aligned=False), "differs"),
        ("RoIAlign adaptive sampling (sampling_ratio=0)", roi_align(sampling_ratio=0), "differs"),
        ("region tokens in reverse order", reversed_region_tokens, "differs"),
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize("name,mutate,expected", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_comparison_fails_when_one_layout_detail_changes(ours, reference, monkeypatch, name, mutate, expected):
    model, processor = ours
    image, boxes = _image(150, 110, 5), _boxes(3, 150, 110, 5)
    question = GPT4ROI_PREAMBLE + "How do region1 <bbox>, region2 <bbox> and region3 <bbox> differ?"
    ref = _reference_prompt_logits(reference, question, image, boxes)
    _assert_same(_our_prompt_logits(model, processor, question, image, boxes), ref)  # unchanged: equal
    mutate(monkeypatch, model, processor)
    if expected != "differs":
        with pytest.raises(expected):
            _our_prompt_logits(model, processor, question, image, boxes)
        return
    ids, logits = _our_prompt_logits(model, processor, question, image, boxes)
    same = ids.tolist() == ref[0].tolist() and torch.allclose(logits, ref[1], atol=ATOL, rtol=0)
    assert not same, f"changing '{name}' went unnoticed"
