"""GPT4RoI's tokenizer, as its training tokenized: LLaMA's SentencePiece model plus six added tokens.

GPT4RoI trained with the slow ``LlamaTokenizer`` of ``transformers@cae78c46``: text is split at added tokens, the
whitespace on both sides of each added token is dropped, each remaining piece is encoded by SentencePiece on its
own (so each gets the ``▁`` word prefix), and ``<s>`` opens the sequence. Its added tokens are, in this order and
after LLaMA's 32000 pieces: ``[PAD]`` (the pad token), ``<im_patch>``, ``<bbox>``, ``<point>``, ``<im_start>``,
``<im_end>``. Current ``transformers`` loads the same files differently (no per-piece prefix unless ``legacy``,
spaces kept beside added tokens, no ``<s>`` without a config that asks for it), which would feed the released
weights token sequences they never saw. :func:`build_gpt4roi_tokenizer` rebuilds the training behaviour from the
``tokenizer.model`` file alone (Metaspace prefix on every piece, added tokens that strip their neighbours'
spaces, ``<s>`` added) and returns it as a plain ``PreTrainedTokenizerFast``, whose ``tokenizer.json`` keeps that
behaviour through every later save and load.

GPT4RoI's *evaluation* scripts loaded a fast tokenizer of ``tokenizers`` 0.12.1 instead, whose spacing at added
tokens was not checked here (those versions do not install beside this project).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from gpt4roi_sft.constants import GPT4ROI_ADDED_TOKENS, GPT4ROI_PAD_TOKEN
from gpt4roi_sft.errors import UserError

logger = logging.getLogger(__name__)

SENTENCEPIECE_FILE = "tokenizer.model"
MODEL_MAX_LENGTH = 2048  # GPT4RoI's model_max_length


class TokenizerError(UserError, ValueError):
    """No usable LLaMA tokenizer, or one whose size does not fit the embedding."""


def build_gpt4roi_tokenizer(sentencepiece_dir: str, rows: int | None = None):
    """GPT4RoI's training tokenizer from ``sentencepiece_dir/tokenizer.model``; ``rows`` (the embedding's) is checked.

    Only the SentencePiece file is read (a directory's other tokenizer files, whatever version wrote them, are
    ignored), so the result is the same for LLaMA-7B, GPT4RoI's delta or a merged directory.
    """
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    model_file = os.path.join(sentencepiece_dir, SENTENCEPIECE_FILE)
    if not os.path.isfile(model_file):
        raise TokenizerError(f"{sentencepiece_dir}: no {SENTENCEPIECE_FILE} (LLaMA's SentencePiece model)")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, os.path.join(tmp, SENTENCEPIECE_FILE))
        base = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True, add_eos_token=False)
    size = len(base)
    if rows is not None and size + len(GPT4ROI_ADDED_TOKENS) != rows:
        raise TokenizerError(f"{model_file} has {size} pieces; GPT4RoI's {rows} embedding rows need "
                             f"{rows - len(GPT4ROI_ADDED_TOKENS)} before its {len(GPT4ROI_ADDED_TOKENS)} added tokens")

    def added(token: str) -> AddedToken:
        return AddedToken(token, lstrip=True, rstrip=True, special=True, normalized=False)

    base.add_special_tokens({"pad_token": added(GPT4ROI_PAD_TOKEN)})
    base.add_tokens([added(t) for t in GPT4ROI_ADDED_TOKENS[1:]], special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token=base.bos_token,
                                  eos_token=base.eos_token, unk_token=base.unk_token, pad_token=GPT4ROI_PAD_TOKEN,
                                  model_max_length=MODEL_MAX_LENGTH)
    ids = tok.convert_tokens_to_ids(list(GPT4ROI_ADDED_TOKENS))
    if ids != list(range(size, size + len(GPT4ROI_ADDED_TOKENS))):
        raise TokenizerError(f"{model_file}: GPT4RoI's added tokens landed at ids {ids}, not {size}..")
    return tok


def check_against(tok, other, where: str) -> None:
    """Warn when another tokenizer of the same checkpoint places GPT4RoI's added tokens elsewhere."""
    try:
        theirs = other.convert_tokens_to_ids(list(GPT4ROI_ADDED_TOKENS))
    except (KeyError, ValueError, TypeError):
        return
    ours = tok.convert_tokens_to_ids(list(GPT4ROI_ADDED_TOKENS))
    if theirs != ours or len(other) != len(tok):
        logger.warning("%s: its own tokenizer has %d tokens with GPT4RoI's added tokens at %s; using %d tokens with "
                       "them at %s (GPT4RoI's order)", where, len(other), theirs, len(tok), ours)
