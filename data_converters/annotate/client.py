"""Asking a VLM about one Set-of-Mark image: the request with its image part, the parse, one re-ask.

Transport, retries with backoff (429 with ``Retry-After``, 5xx, timeouts) and key redaction are
:mod:`gpt4roi_sft.chat_api`'s; this module adds what is specific to captioning marks.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Optional, Sequence

from PIL import Image

from data_converters.annotate.prompt import ParsedReply, merge_replies, parse_reply, reask_text
from gpt4roi_sft.chat_api import ChatAPIError, ChatCompletionsClient

JPEG_QUALITY = 92
TOKENS_PER_REGION = 80  # ~23 words and the "<n>: " prefix, with room to spare
TOKENS_OVERHEAD = 200


@dataclass
class Outcome:
    """What one request (and its re-ask, if any) gave: descriptions by mark number, and its cost."""

    descriptions: dict[int, str]
    missing: list[int]
    problems: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    answered_by: str = ""
    reask_error: Optional[ChatAPIError] = None  # the re-ask failed at the API level (the first reply is kept)


def image_data_url(image: Image.Image) -> str:
    """``data:image/jpeg;base64,...`` of an RGB image (JPEG keeps requests small; the marks stay legible)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class MarkCaptioner:
    """Sends a marked image and the prompt; parses ``<n>: <description>`` lines; re-asks once for the rest.

    ``params`` are extra request fields (``temperature``, ``max_tokens``...); a ``None`` value removes a
    field. When ``max_tokens`` is not given it is sized to the number of marks asked.
    """

    def __init__(self, client: ChatCompletionsClient, params: Optional[dict] = None, reask: bool = True):
        self.client = client
        self.params = dict(params or {})
        self.reask = reask

    def _params(self, count: int) -> dict:
        params = {"max_tokens": TOKENS_PER_REGION * count + TOKENS_OVERHEAD, "temperature": 0.0, **self.params}
        return {k: v for k, v in params.items() if v is not None}

    def describe(self, image: Image.Image, prompt: str, numbers: Sequence[int]) -> Outcome:
        """Ask for one description per number in ``numbers``.

        Raises ``ChatAPIError`` when the first request fails; a failed re-ask is reported in ``reask_error``.
        """
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                                 {"type": "text", "text": prompt}]}]
        outcome = Outcome(descriptions={}, missing=list(numbers))
        reply = self.client.create(messages, **self._params(len(numbers)))
        self._count(outcome, reply)
        parsed: ParsedReply = parse_reply(reply.text, numbers, truncated=reply.finish_reason == "length")
        if parsed.missing and self.reask:
            messages += [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": reask_text(parsed.missing)}]
            try:
                again = self.client.create(messages, **self._params(len(parsed.missing)))
            except ChatAPIError as exc:  # keep what the first reply gave (it was paid for)
                outcome.reask_error = exc
            else:
                self._count(outcome, again)
                parsed = merge_replies(parsed, parse_reply(again.text, parsed.missing,
                                                           truncated=again.finish_reason == "length"))
        outcome.descriptions, outcome.missing, outcome.problems = parsed.descriptions, parsed.missing, parsed.problems
        return outcome

    @staticmethod
    def _count(outcome: Outcome, reply) -> None:
        outcome.replies.append(reply.text)
        outcome.requests += 1
        outcome.prompt_tokens += reply.prompt_tokens
        outcome.completion_tokens += reply.completion_tokens
        outcome.usage_reported = outcome.usage_reported or reply.usage_reported
        outcome.answered_by = reply.model
