"""Append-only, crash-safe store of generated answers, so an interrupted evaluation resumes where it stopped.

Each finished batch is appended to a JSONL file (one ``{"id": ..., <payload>}`` per line) and fsynced before
the next batch starts. On reopening, a last line cut short by a kill is dropped (the file is truncated back
to the last complete line), and an id already present is never written again.

A store may carry a metadata header: the first line ``{"store_metadata": {...}}``, written with the first
batch when the store is opened with ``metadata``. Reopening it with different metadata (another model,
adapter, decoding or test file) is an error, so one file never mixes the answers of two setups.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from gpt4roi_sft.errors import DataError

logger = logging.getLogger(__name__)

METADATA_KEY = "store_metadata"


class PredictionStore:
    """``{id: record}`` backed by ``path`` (JSONL). ``records`` holds what is already done, first write wins.

    ``metadata`` (JSON-able dict): what produced the answers; compared with the header of an existing file.
    ``self.metadata`` is the header's content after opening (``None`` for a file without one).
    """

    def __init__(self, path: os.PathLike | str, metadata: Optional[dict] = None):
        self.path = Path(path)
        self.records: Dict[str, dict] = {}
        self.metadata: Optional[dict] = None
        self._load()
        if metadata is not None:
            metadata = json.loads(json.dumps(metadata))  # as it reads back from the file
            if (self.metadata is not None or self.records) and self.metadata != metadata:
                raise DataError(f"{self.path}: written by another setup ({self.metadata}, this run: {metadata}); "
                                f"choose another output folder or delete the file to start afresh")
            self.metadata = metadata

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1  # bytes after the last newline belong to a write cut short
        if good_end < len(data):
            logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                           self.path, len(data) - good_end)
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        for lineno, line in enumerate(data[:good_end].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if lineno == 1 and isinstance(rec, dict) and METADATA_KEY in rec and "id" not in rec:
                    self.metadata = rec[METADATA_KEY]
                    continue
                key = str(rec["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{self.path} line {lineno}: not a prediction record ({exc}); "
                                f"delete the file to start this evaluation afresh") from None
            self.records.setdefault(key, rec)

    def __contains__(self, key) -> bool:
        return str(key) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, items: Iterable[Tuple[str, dict]]) -> None:
        """Append ``(id, payload)`` pairs not stored yet, then flush and fsync."""
        lines = []
        for key, payload in items:
            key = str(key)
            if key in self.records:
                continue
            rec = {"id": key, **payload}
            self.records[key] = rec
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if not lines:
            return
        if self.metadata is not None and (not self.path.exists() or self.path.stat().st_size == 0):
            lines.insert(0, json.dumps({METADATA_KEY: self.metadata}, ensure_ascii=False) + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
