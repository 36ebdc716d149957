"""A LLaMA-like tokenizer trained on the fly, for tiny test models (no download needed).

It behaves like the SentencePiece LLaMA tokenizer in the ways that matter to label masking: BPE over
Metaspace ("▁") pieces, a ``<s>`` prepended by ``add_special_tokens=True``, ``</s>`` as EOS, and words that
tokenize differently at the start of a text than after a space.
"""

from __future__ import annotations

import string
from typing import Iterable

from gpt4roi_sft.constants import BBOX_TOKEN, IMAGE_TOKEN

# A minimal Vicuna-style chat template so the "tokenizer's own template" path is testable with tiny models.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def train_llama_like_tokenizer(texts: Iterable[str], vocab_size: int = 1200, added_tokens: bool = True):
    """Train a BPE tokenizer on ``texts`` and wrap it as a ``transformers`` fast tokenizer.

    Special tokens: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), then (``added_tokens``) ``<pad>``, ``<image>`` and
    ``<bbox>``; without them it is a bare LLaMA-like base with no pad token, to which a caller adds its own
    (as GPT4RoI adds six to LLaMA's). Every printable ASCII character is in the alphabet, so any English text
    encodes without ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    extra = [IMAGE_TOKEN, BBOX_TOKEN] if added_tokens else []
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] + extra if added_tokens else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if added_tokens else None,
        extra_special_tokens=extra,
        model_max_length=4096,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast
