"""The reply cache: one small JSON file per request, so a rerun asks nothing it already has an answer for.

A request is identified by everything that decides what the VLM sees and is asked (:func:`request_key`):
the image and panoptic PNG bytes, the ordered segment ids (their numbers), the prompt and re-ask texts,
the mark style, the model name and the retry round. Temperature and other request parameters are left
out on purpose: changing them reuses earlier answers (use another ``--work-dir`` to ask afresh).

Layout: ``<dir>/<key[:2]>/<key>.json``, each file written atomically (temp file + rename), so a crash
or Ctrl-C never leaves half an entry, and concurrent workers never touch the same file. Entries hold the
replies, the descriptions by segment id, the failed segment ids and token usage; never the API key or
the image data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from gpt4roi_sft.atomic import write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def request_key(*, image_sha256: str, panoptic_sha256: str, segment_ids: Sequence[int], prompt: str,
                reask_template: str, model: str, mark_style: dict, round_: int = 0) -> str:
    """A hex digest of what one request shows and asks; equal keys mean an interchangeable answer."""
    blob = json.dumps({"format": CACHE_FORMAT, "image": image_sha256, "panoptic": panoptic_sha256,
                       "segments": [int(s) for s in segment_ids], "prompt": prompt, "reask": reask_template,
                       "model": model, "marks": mark_style, "round": round_}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Read and write cache entries by key under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable cache entry (%s); asking again", path, exc)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            log.warning("%s: not a cache entry for this request; asking again", path)
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        write_json_atomic(self.path(key), {**entry, "key": key})
