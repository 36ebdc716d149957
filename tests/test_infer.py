"""RegionCaptioner's chat and streaming entries, and the <regionN> -> ``regionN <bbox>`` mapping."""

import threading

import pytest
import torch
from PIL import Image

from gpt4roi_sft.constants import GPT4ROI_PREAMBLE
from gpt4roi_sft.conversation import build_prompt
from gpt4roi_sft.errors import ConfigError, DataError, UserError
from gpt4roi_sft.infer import DecodeSettings, RegionCaptioner, RegionRequest, chat_request, load_captioner

BOXES = [[10, 10, 60, 60], [70, 20, 150, 110], [5, 80, 40, 115]]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return load_captioner(tiny_model_dir, settings=DecodeSettings(max_new_tokens=24), device="cpu")


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (160, 120), (120, 170, 230))
    img.paste((200, 40, 40), (10, 10, 60, 60))
    img.paste((250, 220, 30), (70, 20, 150, 110))
    return img


def test_chat_request_gives_a_region_its_bbox_at_first_mention_and_its_name_afterwards():
    req = chat_request("img.png", [user("What is <region1>?"), assistant("a red square"),
                                   user("Is <region1> left of <region2>?")], BOXES[:2])
    assert req.history == [{"from": "human", "value": GPT4ROI_PREAMBLE + "What is region1 <bbox>?"},
                           {"from": "gpt", "value": "a red square"}]
    assert req.prompt == "Is region1 left of region2 <bbox>?"
    assert req.boxes == [BOXES[0], BOXES[1]]


def test_chat_request_orders_boxes_by_first_mention_and_leaves_unmentioned_boxes_out():
    req = chat_request("img.png", [user("Compare <region3> with <region1>.")], BOXES)
    assert req.prompt == GPT4ROI_PREAMBLE + "Compare region3 <bbox> with region1 <bbox>."
    assert req.boxes == [BOXES[2], BOXES[0]]


def test_chat_request_without_region_references_asks_about_the_whole_image():
    req = chat_request("img.png", [user("What is in the picture?")], BOXES)
    assert req.prompt == GPT4ROI_PREAMBLE + "What is in the picture?" and req.boxes == []


@pytest.mark.parametrize("messages, boxes, fragment", [
    ([user("What is <region3>?")], BOXES[:2], "messages[0]: <region3> names no box (the boxes are <region1>..<region2>)"),
    ([user("What is <region1>?")], [], "<region1> names no box (no boxes were given)"),
    ([user("What is <bbox> here?")], BOXES, "messages[0].content: contains <bbox>"),
    ([user("hi"), assistant("<image>"), user("and?")], BOXES, "messages[1].content: contains <image>"),
    ([assistant("hello")], BOXES, "messages[0].role: expected 'user'"),
    ([user("hi"), assistant("hello")], BOXES, "the last message must be the user's question"),
    ([user("hi"), user("again")], BOXES, "messages[1].role: expected 'assistant'"),
    ([{"role": "user", "content": 3}], BOXES, "messages[0].content: must be a string"),
    ([], BOXES, "non-empty list"),
])
def test_chat_request_rejects_bad_messages_naming_the_message(messages, boxes, fragment):
    with pytest.raises(DataError) as err:
        chat_request("img.png", messages, boxes)
    assert fragment in str(err.value)


def test_a_chat_request_renders_as_the_conversation_so_far_with_an_open_assistant_turn():
    req = chat_request("img.png", [user("What is <region1>?"), assistant("a red square"), user("And <region2>?")], BOXES)
    expected = build_prompt("gpt4roi_v0", req.history + [{"from": "human", "value": req.prompt}])
    assert RegionCaptioner(None, None).render(req) == expected
    assert expected.endswith("### Assistant: a red square\n### Human: And region2 <bbox>?\n### Assistant:")


def test_prompt_length_counts_what_the_model_reads(captioner, image):
    req = chat_request(image, [user("What is <region1>?"), assistant("red"), user("And <region2>?")], BOXES)
    batch = captioner.processor(images=[image], texts=[captioner.render(req)], boxes=[req.boxes])
    assert captioner.prompt_length(req) == batch["input_ids"].shape[1]


def test_streamed_pieces_join_to_the_batch_answer(captioner, image):
    req = chat_request(image, [user("What is <region1>?"), assistant("a red square"), user("And <region2>?")], BOXES)
    pieces = list(captioner.stream(req))
    assert len(pieces) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == captioner([req])[0]


def scripted_generate(tokenizer, text, calls):
    """A stand-in for ``model.generate`` that decodes ``text`` token by token into the given streamer."""

    def generate(input_ids=None, streamer=None, stopping_criteria=None, **kwargs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        calls.append(kwargs)
        out = []
        if streamer is not None:
            streamer.put(torch.zeros((1, 0), dtype=torch.long))  # the prompt, as generate() sends it first
        for tok in ids:
            out.append(tok)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
        if streamer is not None:
            streamer.end()
        return torch.tensor([out])

    return generate


def test_stream_never_shows_a_stop_string_split_across_tokens(captioner, image, monkeypatch):
    tokenizer = captioner.processor.tokenizer
    text = " a red square above the grass\n### Human: what else"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert not any("###" in t for t in tokens), "the stop string should span several tokens"
    calls = []
    monkeypatch.setattr(captioner.model, "generate", scripted_generate(tokenizer, text, calls))
    req = RegionRequest(image, GPT4ROI_PREAMBLE + "What is region1 <bbox>?", [BOXES[0]])
    pieces = list(captioner.stream(req))
    assert not any("#" in p for p in pieces)
    assert "".join(pieces) == "a red square above the grass" == captioner([req])[0]
    assert calls[0]["stop_strings"] == ["###"], "decoding should stop at the template's stop string"


def test_stream_with_cancel_set_stops_after_one_token(captioner, image, monkeypatch):
    lengths = []
    real = captioner.model.generate

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(captioner.model, "generate", recording)
    cancel = threading.Event()
    cancel.set()
    req = RegionRequest(image, GPT4ROI_PREAMBLE + "What is region1 <bbox>?", [BOXES[0]])
    list(captioner.stream(req, cancel=cancel, max_new_tokens=200))
    assert lengths == [1]


def test_closing_a_stream_early_stops_decoding(captioner, image, monkeypatch):
    lengths = []
    real = captioner.model.generate

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(captioner.model, "generate", recording)
    req = RegionRequest(image, GPT4ROI_PREAMBLE + "What is region1 <bbox>?", [BOXES[0]])
    stream = captioner.stream(req, max_new_tokens=1000)
    assert next(stream)
    stream.close()
    assert len(lengths) == 1 and lengths[0] < 1000
    assert not any(t.name == "region-stream" for t in threading.enumerate())


def test_stream_raises_the_decoding_error(captioner, image, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(captioner.model, "generate", broken)
    req = RegionRequest(image, GPT4ROI_PREAMBLE + "What is region1 <bbox>?", [BOXES[0]])
    with pytest.raises(RuntimeError, match="device lost"):
        list(captioner.stream(req))


def test_a_model_directory_given_as_adapter_is_refused_naming_the_missing_adapter_config(tiny_model_dir):
    with pytest.raises(ConfigError, match=rf"^{tiny_model_dir}: not a LoRA adapter: no adapter_config.json \(it holds a full model"):
        load_captioner(tiny_model_dir, adapter_dir=tiny_model_dir, device="cpu")


@pytest.mark.parametrize("config, reason", [('{"peft_type": "IA3"}', "adapter_config.json: peft_type is 'IA3', not 'LORA'"),
                                            ('{"peft_type": "LORA"}', "not a LoRA adapter: no adapter_model.safetensors"),
                                            ('{"peft_type": ', "adapter_config.json: invalid JSON")])
def test_an_adapter_directory_peft_cannot_load_is_refused_naming_what_is_wrong(tiny_model_dir, tmp_path, config, reason):
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(UserError, match=reason):
        load_captioner(tiny_model_dir, adapter_dir=str(tmp_path), device="cpu")


def test_an_adapter_is_merged_in_memory_and_its_files_are_left_as_they_were(tiny_model_dir, image, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from gpt4roi_sft import load_model

    base, processor = load_model(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))  # random B: the adapter changes the outputs
    lora.save_pretrained(str(tmp_path / "adapter"))
    files = {f.name: f.read_bytes() for f in (tmp_path / "adapter").iterdir()}
    merged = load_captioner(tiny_model_dir, adapter_dir=str(tmp_path / "adapter"), device="cpu")
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.model.modules())
    assert {f.name: f.read_bytes() for f in (tmp_path / "adapter").iterdir()} == files
    req = RegionRequest(image, GPT4ROI_PREAMBLE + "What is region1 <bbox>?", [BOXES[0]])
    batch = merged.prepare([req])
    plain, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        want = lora.eval()(**batch).logits
        assert (want - plain.eval()(**batch).logits).abs().max() > 1e-2, "the adapter should change the outputs"
        assert torch.allclose(merged.model(**batch).logits, want, atol=1e-4)
