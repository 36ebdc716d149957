"""Templates and the label mask, checked token by token (turn boundaries are where masks go wrong)."""

import pytest

from gpt4roi_sft.constants import IGNORE_INDEX
from gpt4roi_sft.conversation import (
    GPT4ROI_SYSTEM,
    VICUNA_SYSTEM,
    build_prompt,
    render_segments,
    stop_strings,
    tokenize_conversation,
)
from gpt4roi_sft.errors import ConfigError, DataError
from gpt4roi_sft.tokenization import train_llama_like_tokenizer

MESSAGES = [
    {"from": "human", "value": "<image>\nWhat is region1 <bbox>?"},
    {"from": "gpt", "value": "A red cat."},
    {"from": "human", "value": "And region2 <bbox>?"},
    {"from": "gpt", "value": "Two dogs."},
]


@pytest.fixture(scope="module")
def tokenizer():
    # Newlines only between spaces, so (as in LLaMA's vocabulary) no merge crosses a turn boundary.
    texts = [
        GPT4ROI_SYSTEM + " \n ### Human: what is this? \n ### Assistant: a red cat sat on the mat. \n ### ",
        VICUNA_SYSTEM + " USER: hello ASSISTANT: two dogs and a red cat.",
        "What is region1? And region2? A red cat. Two dogs.",
    ]
    return train_llama_like_tokenizer(texts, vocab_size=400)


def pieces(tok, ids):
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ")


def labelled_runs(tok, ids, labels):
    """Decoded text of each maximal run of trained tokens, with the index range of the run."""
    runs, start = [], None
    for t, lab in enumerate(list(labels) + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = t
        if lab == IGNORE_INDEX and start is not None:
            runs.append((pieces(tok, ids[start:t]), start, t))
            start = None
    return runs


def full_text(template, tok, messages=MESSAGES):
    return "".join(t for t, _ in render_segments(template, messages, tok))


@pytest.mark.parametrize("template", ["gpt4roi_v0", "vicuna_v1", "chat_template"])
def test_input_ids_equal_tokenizing_the_whole_text_once(tokenizer, template):
    out = tokenize_conversation(tokenizer, MESSAGES, template)
    add_special = template != "chat_template"
    assert out.input_ids == tokenizer(full_text(template, tokenizer), add_special_tokens=add_special)["input_ids"]
    assert len(out.labels) == len(out.input_ids)


@pytest.mark.parametrize("template", ["gpt4roi_v0", "vicuna_v1", "chat_template"])
def test_labels_are_input_ids_or_ignored(tokenizer, template):
    out = tokenize_conversation(tokenizer, MESSAGES, template)
    assert all(lab in (tid, IGNORE_INDEX) for tid, lab in zip(out.input_ids, out.labels))
    assert out.labels[0] == IGNORE_INDEX  # BOS


def test_gpt4roi_v0_renders_the_gpt4roi_training_text(tokenizer):
    assert full_text("gpt4roi_v0", tokenizer) == (
        GPT4ROI_SYSTEM + "\n\n"
        "### Human: <image>\nWhat is region1 <bbox>?\n"
        "### Assistant: A red cat.\n"
        "### Human: And region2 <bbox>?\n"
        "### Assistant: Two dogs.\n"
        "### "
    )


def test_gpt4roi_v0_trains_assistant_turns_and_the_following_separator(tokenizer):
    out = tokenize_conversation(tokenizer, MESSAGES, "gpt4roi_v0")
    runs = labelled_runs(tokenizer, out.input_ids, out.labels)
    assert [r[0] for r in runs] == ["### Assistant: A red cat.\n###", "### Assistant: Two dogs.\n###"]
    ids = out.input_ids
    for _, start, end in runs:
        assert pieces(tokenizer, ids[start - 1 : start]) == "\n"  # end of the human turn, untrained
    assert pieces(tokenizer, ids[runs[0][2] : runs[0][2] + 1]) == " Human:"
    assert runs[1][2] == len(ids) - 1 and pieces(tokenizer, ids[-1:]) == " "  # closing '### ' space untrained


def test_gpt4roi_v0_does_not_train_the_first_separator_after_the_system_text(tokenizer):
    out = tokenize_conversation(tokenizer, MESSAGES, "gpt4roi_v0")
    text = pieces(tokenizer, [t for t, lab in zip(out.input_ids, out.labels) if lab == IGNORE_INDEX][:40])
    assert text.startswith("<s>")
    first_hash = next(t for t in range(len(out.input_ids)) if "#" in pieces(tokenizer, out.input_ids[t : t + 1]))
    assert out.labels[first_hash] == IGNORE_INDEX


def test_vicuna_v1_trains_answers_and_eos_only(tokenizer):
    out = tokenize_conversation(tokenizer, MESSAGES, "vicuna_v1")
    runs = labelled_runs(tokenizer, out.input_ids, out.labels)
    assert [r[0] for r in runs] == [" A red cat.</s>", " Two dogs.</s>"]
    ids = out.input_ids
    assert pieces(tokenizer, ids[runs[0][1] - 1 : runs[0][1]]) == " ASSISTANT:"  # the role stays untrained
    assert pieces(tokenizer, ids[runs[0][2] : runs[0][2] + 1]) == "USER"  # next turn starts untrained
    assert runs[1][2] == len(ids) and ids[-1] == tokenizer.eos_token_id


def test_token_straddling_a_boundary_is_trained_when_it_covers_trained_text():
    # This tokenizer merges '?\n###' into one token: it ends a human turn and starts the trained header.
    tok = train_llama_like_tokenizer(["What is this?\n### Assistant: a cat.\n### Human: What is this?\n###"], 300)
    messages = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "a cat."}]
    out = tokenize_conversation(tok, messages, "gpt4roi_v0")
    straddling = [t for t, i in enumerate(out.input_ids) if "?\n#" in tok.convert_ids_to_tokens(i)]
    assert straddling and all(out.labels[t] != IGNORE_INDEX for t in straddling)


def test_chat_template_trains_assistant_spans(tokenizer):
    out = tokenize_conversation(tokenizer, MESSAGES, "chat_template")
    runs = labelled_runs(tokenizer, out.input_ids, out.labels)
    assert [r[0] for r in runs] == [" A red cat.</s>", " Two dogs.</s>"]


def test_chat_template_mask_agrees_with_the_generation_block_mask(tokenizer):
    chat = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in MESSAGES]
    ref = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    out = tokenize_conversation(tokenizer, MESSAGES, "chat_template")
    assert out.input_ids == list(ref["input_ids"])
    assert [int(lab != IGNORE_INDEX) for lab in out.labels] == list(ref["assistant_masks"])


def test_chat_template_that_is_not_prefix_stable_is_rejected(tokenizer):
    tok = train_llama_like_tokenizer(["a b c"], vocab_size=120)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}NEXT{% endif %}"
    )
    with pytest.raises(ConfigError, match="prefix"):
        tokenize_conversation(tok, MESSAGES, "chat_template")


@pytest.mark.parametrize("template", ["gpt4roi_v0", "vicuna_v1"])
def test_truncation_drops_whole_trailing_pairs(tokenizer, template):
    full = tokenize_conversation(tokenizer, MESSAGES, template)
    first = tokenize_conversation(tokenizer, MESSAGES[:2], template)
    out = tokenize_conversation(tokenizer, MESSAGES, template, max_length=len(full.input_ids) - 1)
    assert out.num_dropped_turns == 2
    assert out.input_ids == first.input_ids and out.labels == first.labels


def test_conversation_that_fits_drops_nothing(tokenizer):
    full = tokenize_conversation(tokenizer, MESSAGES, "gpt4roi_v0")
    out = tokenize_conversation(tokenizer, MESSAGES, "gpt4roi_v0", max_length=len(full.input_ids))
    assert out.num_dropped_turns == 0 and out.input_ids == full.input_ids


def test_first_pair_longer_than_max_length_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="max_length 5"):
        tokenize_conversation(tokenizer, MESSAGES, "gpt4roi_v0", max_length=5)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], "alternate"),
        ([{"from": "human", "value": "x"}], "end with a 'gpt'"),
        ([{"from": "human", "value": "x"}, {"from": "gpt"}], "'from' and 'value'"),
    ],
)
def test_malformed_conversations_are_data_errors(tokenizer, messages, match):
    with pytest.raises(DataError, match=match):
        tokenize_conversation(tokenizer, messages, "gpt4roi_v0")


def test_unknown_template_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="gpt4roi_v0"):
        tokenize_conversation(tokenizer, MESSAGES, "llama9")


@pytest.mark.parametrize("template", ["gpt4roi_v0", "vicuna_v1", "chat_template"])
def test_generation_prompt_is_the_training_text_up_to_the_answer(tokenizer, template):
    prompt = build_prompt(template, MESSAGES[:3], tokenizer)
    text = full_text(template, tokenizer)
    assert text.startswith(prompt)
    assert text[len(prompt) :].lstrip().startswith("Two dogs.")


def test_gpt4roi_v0_prompt_for_a_single_question(tokenizer):
    prompt = build_prompt("gpt4roi_v0", MESSAGES[:1])
    assert prompt == GPT4ROI_SYSTEM + "\n\n### Human: <image>\nWhat is region1 <bbox>?\n### Assistant:"


def test_prompt_must_end_with_a_human_message():
    with pytest.raises(DataError, match="last message"):
        build_prompt("vicuna_v1", MESSAGES[:2])


def test_stop_strings():
    assert stop_strings("gpt4roi_v0") == ["###"]
    assert stop_strings("vicuna_v1") == ["</s>"]


def test_a_template_added_to_the_registry_is_used_by_config_tokenization_and_generation(tokenizer, monkeypatch):
    from gpt4roi_sft.config import load_config
    from gpt4roi_sft.conversation import TEMPLATES, RoleTemplate

    monkeypatch.setitem(TEMPLATES, "plain", RoleTemplate("plain", "Talk.", "\n", roles=("Q:", "A:"), ends=("\n", "\n"),
                                                         stop_strings=("Q:",)))
    assert load_config(None, ["data.template=plain"]).data.template == "plain"
    out = tokenize_conversation(tokenizer, MESSAGES, "plain")
    trained = pieces(tokenizer, [t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX])
    assert "".join(trained.split()) == "Aredcat.Twodogs."
    assert build_prompt("plain", MESSAGES[:1]) == "Talk.\nQ: <image>\nWhat is region1 <bbox>?\nA:"
    assert stop_strings("plain") == ["Q:"]
