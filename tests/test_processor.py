"""GPT4RoIProcessor: token expansion, box mapping and validation, padding, save/load."""

import pytest
import torch
from PIL import Image

from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.errors import BoxError
from gpt4roi_sft.model.processing import GPT4RoIProcessor
from quickstart.tiny_model import tiny_tokenizer_corpus
from gpt4roi_sft.tokenization import train_llama_like_tokenizer

N_IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def proc():
    tok = train_llama_like_tokenizer(tiny_tokenizer_corpus()[:200], vocab_size=400)
    return GPT4RoIProcessor(tok, ImageTransform(size=56), N_IMAGE_TOKENS)


def _img(w=200, h=100):
    return Image.new("RGB", (w, h), (10, 200, 30))


def test_image_expands_to_num_image_tokens_and_each_bbox_stays_one_token(proc):
    out = proc(images=[_img()], texts=["<image> region1 <bbox> and region2 <bbox>"], boxes=[[[0, 0, 50, 50], [10, 10, 90, 90]]])
    ids = out["input_ids"][0].tolist()
    assert ids.count(proc.image_token_id) == N_IMAGE_TOKENS
    assert ids.count(proc.bbox_token_id) == 2
    assert out["pixel_values"].shape == (1, 3, 56, 56)


def test_boxes_become_fractions_of_the_square_image(proc):
    out = proc(images=[_img(200, 100)], texts=["<image> region1 <bbox>"], boxes=[[[50, 25, 100, 100]]])
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[0.25, 0.25, 0.5, 1.0]]))


def test_left_padding_puts_pads_first_and_masks_them(proc):
    out = proc(texts=["short", "a much longer text about the picture"], padding_side="left")
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    assert out["input_ids"][0, 0] == proc.tokenizer.pad_token_id


def test_expand_image_tokens_ignores_labels_of_image_tokens(proc):
    ids, labels = proc.expand_image_tokens([1, proc.image_token_id, 7], [IGNORE_INDEX, 5, 7])
    assert len(ids) == N_IMAGE_TOKENS + 2
    assert labels == [IGNORE_INDEX] * (N_IMAGE_TOKENS + 1) + [7]


@pytest.mark.parametrize("boxes", [[], [[0, 0, 10, 10], [5, 5, 20, 20]]])
def test_box_count_mismatch_names_the_sample_and_both_counts(proc, boxes):
    with pytest.raises(BoxError, match=rf"sample 1: {len(boxes)} boxes for 1 <bbox>"):
        proc(images=[_img(), _img()], texts=["<image> x", "<image> region1 <bbox>"], boxes=[[], boxes])


@pytest.mark.parametrize(
    "box, why",
    [([30, 10, 20, 40], "empty"), ([float("nan"), 0, 10, 10], "non-finite"), ([300, 10, 320, 20], "outside"),
     ([150, 10, 250, 50], "crosses")],
)
def test_bad_box_is_an_error_naming_the_sample(proc, box, why):
    with pytest.raises(BoxError, match=rf"sample 0.*{why}"):
        proc(images=[_img()], texts=["<image> region1 <bbox>"], boxes=[[box]])


def test_clip_boxes_clips_a_box_crossing_the_border(proc):
    out = proc(images=[_img(200, 100)], texts=["<image> region1 <bbox>"], boxes=[[[150, 50, 250, 150]]], clip_boxes=True)
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[0.75, 0.5, 1.0, 1.0]]))


def test_save_and_load_round_trip_gives_the_same_encoding(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    again = GPT4RoIProcessor.from_pretrained(str(tmp_path))
    kw = dict(images=[_img()], texts=["<image> region1 <bbox> is green"], boxes=[[[0, 0, 50, 50]]])
    a, b = proc(**kw), again(**kw)
    assert torch.equal(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert again.num_image_tokens == N_IMAGE_TOKENS
