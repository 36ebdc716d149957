"""Conversation templates, prompt rendering, and tokenization with the training label mask.

A conversation is the record's list of ``{"from": "human"|"gpt", "value": str}`` messages. Each template
renders it to one string made of *segments*, each marked trained or not; the string is tokenized once and
each token takes its label from the characters it covers (via the tokenizer's offset mapping). Tokenizing
turns one by one and adding up their lengths is what puts LLaVA-style masks off by one at turn boundaries
(a BOS per piece, separators that merge with their neighbours in context); mapping character spans of the
whole text cannot drift.

A template is one :class:`ConversationTemplate` object (its segments, generation prompt, stop strings and
label rule) in :data:`TEMPLATES`, the registry that config validation, the dataset, inference and the tiny
tokenizer read; adding a template is adding one entry there.

- ``gpt4roi_v0``: GPT4RoI's training format (``conv_v1_2`` system, ``_add_speaker_and_signal``):
  ``{system}\\n\\n### Human: {x}\\n### Assistant: {y}\\n ... ### ``. As in GPT4RoI the whole assistant
  turn is trained, its ``### Assistant:`` header included, and so is the ``###`` that follows it (the
  start of the next human turn, or the closing ``### ``), which is what teaches the model to stop.
  Unlike GPT4RoI the first human turn's ``###`` (right after the system text) is not trained: it follows
  text the model never generates.
- ``gpt4roi_original``: the same text and label rule, in the layout GPT4RoI's released checkpoints read
  (``preprocess_multimodal`` with ``mm_use_im_start_end``): each ``<image>`` is written as ``<im_start>``,
  256 ``<im_patch>`` and ``<im_end>`` (CLIP ViT-L/14 at 224 px), and a generation prompt ends with the open
  ``### `` that GPT4RoI's own inference writes (its ``preprocess`` on a conversation ending with a human
  turn), so the model itself writes ``Assistant: ...``; cut at ``###`` and keep what follows the first
  ``": "`` (``DecodeSettings.strip_prefix``), as GPT4RoI's evaluation does. Models converted from GPT4RoI
  checkpoints have no ``<image>`` token; their processor checks that prompts come in this layout.
- ``vicuna_v1``: LLaVA's ``conv_vicuna_v1``: ``{system} USER: {x} ASSISTANT: {y}</s>USER: ...``;
  the answer and its ``</s>`` are trained.
- ``chat_template``: the tokenizer's own Jinja chat template. Each assistant message's trained span is the
  text between the prefix rendered with ``add_generation_prompt=True`` and the prefix that includes the
  message (so whatever the template appends to an answer, e.g. an end-of-turn token, is trained too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from gpt4roi_sft.constants import (GPT4ROI_NUM_PATCHES, IGNORE_INDEX, IM_END_TOKEN, IM_PATCH_TOKEN, IM_START_TOKEN,
                                   IMAGE_TOKEN)
from gpt4roi_sft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

GPT4ROI_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("human", "gpt")

# (text, trained) pieces whose concatenation is the rendered conversation.
Segments = List[Tuple[str, bool]]


@dataclass
class TokenizedConversation:
    """Token ids and labels of one conversation.

    ``labels[t]`` is ``input_ids[t]`` where the loss is taken and ``IGNORE_INDEX`` elsewhere (labels are
    not shifted; the model shifts). ``num_dropped_turns`` counts the trailing messages (human and gpt
    each count one, so it is always even) removed to fit ``max_length``.
    """

    input_ids: List[int]
    labels: List[int]
    num_dropped_turns: int = 0


class ConversationTemplate:
    """One conversation format: how messages render, what trains, how generation is prompted and stopped.

    ``segments`` renders a complete conversation as ``(text, trained)`` pieces: the trained flags *are* the
    label rule. ``generation_prompt`` renders messages ending with a human turn followed by the open assistant
    turn, matching the training text up to where the answer starts. ``stop_strings`` end a generated answer
    (beside the tokenizer's EOS). ``add_special_tokens`` says whether the tokenizer adds its BOS to the rendered
    text (False when the template writes its own). ``vocabulary`` lists the fixed strings the template writes,
    which a tokenizer trained for it (the tiny test models') must cover.
    """

    name: str
    stop_strings: Tuple[str, ...] = ()
    add_special_tokens: bool = True
    vocabulary: Tuple[str, ...] = ()
    # How the rendered text holds an image: "image_token" keeps ``<image>`` (the processor expands the token),
    # "im_start_end" writes GPT4RoI's ``<im_start><im_patch>...<im_end>`` (see gpt4roi_sft.data.model_inputs).
    image_layout: str = "image_token"

    def segments(self, messages: Sequence[dict], tokenizer=None) -> Segments:
        raise NotImplementedError

    def generation_prompt(self, messages: Sequence[dict], tokenizer=None) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class RoleTemplate(ConversationTemplate):
    """``{system}{system_end}``, then each message as ``{role} {value}{end}``, then ``closing``.

    ``roles`` and ``ends`` are the (human, assistant) headers and the text after each message. Label rule: an
    answer's value and end are trained, its header too when ``train_role``; with ``train_stop`` the stop string
    that opens the text after an answer (the next human turn, or the closing) is trained as well.
    ``image_text`` (when set) replaces ``<image>`` in the messages (an image layout written in the text);
    ``generation_open`` is what follows the last human turn of a generation prompt (default: the assistant
    header).
    """

    name: str
    system: str
    system_end: str
    roles: Tuple[str, str]
    ends: Tuple[str, str]
    stop_strings: Tuple[str, ...]
    closing: str = ""
    train_role: bool = False
    train_stop: bool = False
    image_text: Optional[str] = None
    generation_open: Optional[str] = None

    @property
    def vocabulary(self) -> Tuple[str, ...]:
        return (self.system, *self.roles)

    @property
    def image_layout(self) -> str:
        return "im_start_end" if self.image_text else "image_token"

    def _value(self, message: dict) -> str:
        value = message["value"]
        return value.replace(IMAGE_TOKEN, self.image_text) if self.image_text else value

    def _after_answer(self, text: str) -> Segments:
        stop = self.stop_strings[0] if self.stop_strings else ""
        if self.train_stop and stop and text.startswith(stop):
            return [(stop, True), (text[len(stop):], False)]
        return [(text, False)]

    def _turns(self, messages: Sequence[dict]) -> Segments:
        segs: Segments = [(self.system + self.system_end, False)]
        for k, m in enumerate(messages):
            assistant = m["from"] == "gpt"
            role, end = self.roles[assistant], self.ends[assistant]
            text = f"{role} {self._value(m)}{end}"
            if assistant:
                header = "" if self.train_role else f"{role} "
                segs += [(header, False), (text[len(header):], True)]
            elif k > 0:  # turns alternate, so every human turn but the first follows an answer
                segs += self._after_answer(text)
            else:
                segs.append((text, False))
        return segs

    def segments(self, messages: Sequence[dict], tokenizer=None) -> Segments:
        return [s for s in self._turns(messages) + self._after_answer(self.closing) if s[0]]

    def generation_prompt(self, messages: Sequence[dict], tokenizer=None) -> str:
        opening = self.roles[1] if self.generation_open is None else self.generation_open
        return "".join(t for t, _ in self._turns(messages)) + opening


@dataclass(frozen=True)
class ChatTemplate(ConversationTemplate):
    """The tokenizer's own Jinja ``chat_template`` (it writes its own BOS; the template decides how answers end)."""

    name: str
    add_special_tokens: bool = False

    @staticmethod
    def _chat(messages: Sequence[dict]) -> List[dict]:
        role = {"human": "user", "gpt": "assistant"}
        return [{"role": role[m["from"]], "content": m["value"]} for m in messages]

    @staticmethod
    def _render(tokenizer, chat: List[dict], add_generation_prompt: bool) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'chat_template' needs a tokenizer that has a chat_template")
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, messages: Sequence[dict], tokenizer=None) -> Segments:
        chat = self._chat(messages)
        segs: Segments = []
        done = 0  # characters of the full rendering already covered by segments
        for k, msg in enumerate(chat):
            if msg["role"] != "assistant":
                continue
            before = self._render(tokenizer, chat[:k], add_generation_prompt=True)
            after = self._render(tokenizer, chat[: k + 1], add_generation_prompt=False)
            if not after.startswith(before) or len(before) < done:
                raise ConfigError(
                    "the tokenizer's chat template does not render conversations prefix by prefix "
                    "(a shorter conversation is not a prefix of a longer one), so assistant spans cannot be found"
                )
            segs += [(before[done:], False), (after[len(before):], True)]
            done = len(after)
        full = self._render(tokenizer, chat, add_generation_prompt=False)
        if not full.startswith("".join(t for t, _ in segs)):
            raise ConfigError("the tokenizer's chat template renders the full conversation differently from its prefixes")
        segs.append((full[done:], False))
        return [s for s in segs if s[0]]

    def generation_prompt(self, messages: Sequence[dict], tokenizer=None) -> str:
        return self._render(tokenizer, self._chat(messages), add_generation_prompt=True)


TEMPLATES: Dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        RoleTemplate("gpt4roi_v0", GPT4ROI_SYSTEM, "\n\n", roles=("### Human:", "### Assistant:"), ends=("\n", "\n"),
                     stop_strings=("###",), closing="### ", train_role=True, train_stop=True),
        RoleTemplate("gpt4roi_original", GPT4ROI_SYSTEM, "\n\n", roles=("### Human:", "### Assistant:"),
                     ends=("\n", "\n"), stop_strings=("###",), closing="### ", train_role=True, train_stop=True,
                     image_text=IM_START_TOKEN + IM_PATCH_TOKEN * GPT4ROI_NUM_PATCHES + IM_END_TOKEN,
                     generation_open="### "),
        RoleTemplate("vicuna_v1", VICUNA_SYSTEM, " ", roles=("USER:", "ASSISTANT:"), ends=(" ", "</s>"),
                     stop_strings=("</s>",)),
        ChatTemplate("chat_template"),
    )
}


def get_template(name: str) -> ConversationTemplate:
    """The registered template called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def validate_messages(messages: Sequence[dict], where: str = "conversations", require_answer: bool = True) -> None:
    """Check that messages alternate human/gpt starting with human (and, with ``require_answer``, end with gpt and
    hold no empty answer)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: must be a non-empty list of messages")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise DataError(f"{where}[{k}]: each message needs 'from' and 'value'")
        if not isinstance(msg["value"], str):
            raise DataError(f"{where}[{k}].value: must be a string, got {type(msg['value']).__name__}")
        expected = ROLES[k % 2]
        if msg["from"] != expected:
            raise DataError(
                f"{where}[{k}].from: expected {expected!r} (turns must alternate human/gpt, starting with human), "
                f"got {msg['from']!r}"
            )
    if not require_answer:
        return
    if messages[-1]["from"] != "gpt":
        raise DataError(f"{where}: the conversation must end with a 'gpt' message")
    for k in range(1, len(messages), 2):
        if not messages[k]["value"].strip():  # an empty answer trains the model to say nothing
            raise DataError(f"{where}[{k}].value: a 'gpt' answer must not be empty")


def render_segments(template: str, messages: Sequence[dict], tokenizer=None) -> Segments:
    """Render a complete conversation (ending with a gpt message) as ``(text, trained)`` segments."""
    return get_template(template).segments(messages, tokenizer)


def build_prompt(template: str, messages: Sequence[dict], tokenizer=None) -> str:
    """Render ``messages`` (ending with a human message) followed by an open assistant turn, for generation.

    The text matches the training rendering up to the point where the answer starts, so the model
    continues as it learned to; cut the output at :func:`stop_strings`.
    """
    tpl = get_template(template)
    validate_messages(messages, where="prompt", require_answer=False)
    if messages[-1]["from"] != "human":
        raise DataError("prompt: the last message must be a 'human' message (the assistant turn is left open)")
    return tpl.generation_prompt(messages, tokenizer)


def stop_strings(template: str) -> List[str]:
    """Strings at which a generated answer ends (beside the tokenizer's EOS)."""
    return list(get_template(template).stop_strings)


def _label_tokens(segments: Segments, offsets, input_ids: List[int]) -> List[int]:
    """Label each token from the characters it covers.

    A token is trained when any non-whitespace character it covers lies in a trained segment (a
    whitespace-only token when all its characters do). Special tokens the tokenizer adds itself (BOS,
    offsets ``(0, 0)``) cover nothing and are never trained.
    """
    text = "".join(t for t, _ in segments)
    trained = bytearray(len(text))
    pos = 0
    for seg, is_trained in segments:
        if is_trained:
            trained[pos : pos + len(seg)] = b"\x01" * len(seg)
        pos += len(seg)
    labels = []
    for tok, (a, b) in zip(input_ids, offsets):
        chars = range(a, b)
        solid = [i for i in chars if not text[i].isspace()]
        if solid:
            on = any(trained[i] for i in solid)
        else:
            on = b > a and all(trained[i] for i in chars)
        labels.append(tok if on else IGNORE_INDEX)
    return labels


def _tokenize(tokenizer, template: ConversationTemplate, messages: Sequence[dict]) -> Tuple[List[int], List[int]]:
    segments = template.segments(messages, tokenizer)
    text = "".join(t for t, _ in segments)
    enc = tokenizer(text, add_special_tokens=template.add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return ids, _label_tokens(segments, enc["offset_mapping"], ids)


def tokenize_conversation(
    tokenizer, messages: Sequence[dict], template: str = "gpt4roi_v0", max_length: Optional[int] = None
) -> TokenizedConversation:
    """Tokenize a complete conversation and build its label mask.

    ``tokenizer`` must be a fast tokenizer (offset mapping). When the result is longer than ``max_length``
    whole trailing human/gpt pairs are dropped (never part of a turn, so a ``<bbox>`` always keeps its
    region); the caller drops the regions of the dropped turns. If even the first pair does not fit, a
    :class:`DataError` is raised.
    """
    tpl = get_template(template)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("tokenize_conversation needs a fast tokenizer (it maps characters to tokens via offsets)")
    validate_messages(messages)
    num_pairs = len(messages) // 2
    keep = num_pairs
    ids, labels = _tokenize(tokenizer, tpl, messages)
    while max_length is not None and len(ids) > max_length:
        keep -= 1
        if keep == 0:
            raise DataError(
                f"conversation too long: its first human/gpt pair alone is {len(ids)} tokens > max_length {max_length}"
            )
        ids, labels = _tokenize(tokenizer, tpl, messages[: 2 * keep])
    if not any(lab != IGNORE_INDEX for lab in labels):
        logger.warning("conversation has no trained token (empty answers?)")
    return TokenizedConversation(ids, labels, 2 * (num_pairs - keep))
