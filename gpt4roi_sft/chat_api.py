"""A small client of OpenAI-compatible ``POST {base_url}/chat/completions`` endpoints (standard library only).

Shared by the ViP-Bench judge (:mod:`eval.judge`) and the Set-of-Mark annotator
(:mod:`data_converters.annotate`): any server that speaks the chat-completions protocol works (OpenAI,
vLLM, SGLang, llama.cpp, Ollama, LiteLLM, ...).

- Transient failures (HTTP 408/409/429/5xx, timeouts, refused connections, a body that is not a
  chat-completions reply) are retried with exponential backoff, capped; a ``Retry-After`` header (seconds
  or an HTTP date) is honoured up to the same cap.
- Other 4xx answers are not retried: they mean the request, model name or key is wrong.
- The API key goes only into the ``Authorization`` header. It is redacted from every message this module
  logs or raises (also fragments of it that a server may echo back), and never appears in ``repr``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, List, Optional

from gpt4roi_sft.errors import UserError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = (408, 409, 429)
# The shortest run of key characters treated as a leak when a server echoes part of a key back.
_KEY_FRAGMENT = 8


class ChatAPIError(UserError):
    """The endpoint refused a request (``refused`` and ``status`` set) or stayed unreachable after the retries."""

    def __init__(self, message: str, refused: bool = False, status: Optional[int] = None):
        super().__init__(message)
        self.refused = refused
        self.status = status


@dataclass
class ChatAPISettings:
    """Where the endpoint lives and how patiently to talk to it."""

    base_url: str
    model: str
    timeout_s: float = 60.0
    max_api_retries: int = 5  # extra attempts after a transient error
    backoff_s: float = 2.0  # first wait; doubles each time, capped at max_backoff_s
    max_backoff_s: float = 60.0

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


@dataclass
class ChatReply:
    """One assistant message: its text, the model id the server reports, and token usage (0 if unreported)."""

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    finish_reason: str = ""  # "length" when the reply was cut at the token limit


def redact(text: str, secret: Optional[str]) -> str:
    """``text`` with ``secret`` and any run of >= 8 of its characters replaced by ``***``."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    if len(secret) < _KEY_FRAGMENT:
        return text

    def scrub(match: re.Match) -> str:
        token = match.group(0)
        for start in range(len(token) - _KEY_FRAGMENT + 1):
            if token[start:start + _KEY_FRAGMENT] in secret:
                return "***"
        return token

    return re.sub(r"[A-Za-z0-9_\-]{%d,}" % _KEY_FRAGMENT, scrub, text)


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds asked for by a ``Retry-After`` header (a number or an HTTP date), ``None`` if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own error message (OpenAI-style ``{"error": {"message": ...}}`` or text), shortened."""
    try:
        body = exc.read(2000).decode("utf-8", "replace")
    except Exception:  # the body is a courtesy; never let reading it hide the status
        return ""
    try:
        parsed = json.loads(body)
        err = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        message = err.get("message", "") if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        message = body
    message = " ".join(str(message).split())
    return message[:200]


class ChatCompletionsClient:
    """Sends chat-completions requests with bounded retries; thread-safe (no shared mutable state).

    ``name`` prefixes log lines and errors (``"judge"``, ``"VLM"``); ``sleep`` is injectable for tests.
    """

    def __init__(self, settings: ChatAPISettings, api_key: Optional[str] = None, name: str = "chat API",
                 sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.name = name
        self._api_key = api_key
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.settings.url!r}, model={self.settings.model!r})"

    def redact(self, text: str) -> str:
        return redact(text, self._api_key)

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.settings.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def create(self, messages: List[dict], **params) -> ChatReply:
        """Send ``messages`` (plus ``params`` such as ``max_tokens``, ``temperature``); return the first choice.

        Raises :class:`ChatAPIError` on a refusal (no retry) or after ``max_api_retries`` transient failures.
        """
        s = self.settings
        body = json.dumps({"model": s.model, "messages": messages, **params}).encode("utf-8")
        last = ""
        for attempt in range(s.max_api_retries + 1):
            asked_wait = None
            try:
                reply = self._post(body)
                return _parse_reply(reply, s.model)
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code not in RETRYABLE_STATUS and exc.code < 500:
                    detail = _error_detail(exc)
                    reason = f"{last} {exc.reason}" + (f": {detail}" if detail else "")
                    raise ChatAPIError(self.redact(f"{self.name} at {s.url} refused the request ({reason})"),
                                       refused=True, status=exc.code) from None
                asked_wait = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
                last = f"malformed reply ({type(exc).__name__})"
            if attempt < s.max_api_retries:
                wait = s.backoff_s * (2 ** attempt)
                if asked_wait is not None:
                    wait = max(wait, asked_wait)
                wait = min(s.max_backoff_s, wait)
                logger.warning("%s: %s; retry %d/%d in %.1fs", self.name, self.redact(last), attempt + 1,
                               s.max_api_retries, wait)
                self._sleep(wait)
        raise ChatAPIError(self.redact(f"{self.name} at {s.url} failed {s.max_api_retries + 1} times (last: {last})"))


def _parse_reply(reply: dict, requested_model: str) -> ChatReply:
    choice = reply["choices"][0]
    message = choice["message"]
    text = message.get("content") or ""
    if isinstance(text, list):  # some servers return content parts even for text
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if not isinstance(text, str):
        raise TypeError("content is not text")
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    reported = isinstance(prompt_tokens, int) or isinstance(completion_tokens, int)
    return ChatReply(text=text, model=str(reply.get("model") or requested_model),
                     prompt_tokens=int(prompt_tokens or 0), completion_tokens=int(completion_tokens or 0),
                     usage_reported=reported, finish_reason=str(choice.get("finish_reason") or ""))
