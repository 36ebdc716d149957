"""Append-only, crash-safe store of generated answers, so an interrupted evaluation resumes where it stopped.

Each finished batch is appended to a JSONL file (one ``{"id": ..., <payload>}`` per line) and fsynced before
the next batch starts. On reopening, a last line cut short by a kill is dropped (the file is truncated back
to the last complete line), and an id already present is never written again.

A store may carry a metadata header: the first line ``{"store_metadata": {...}, "produced_by": {...}}``,
written with the first batch when the store is opened with ``metadata``. ``store_metadata`` is the setup
compared on reopening (fingerprints of the model and adapter, decoding, template, prompt, test file):
reopening with a different one is an error naming what changed, so one file never mixes the answers of two
setups, unless the store is opened with ``overwrite=True``, which starts it afresh. ``produced_by`` only
describes (model paths, checkpoint step) and is never compared: a moved model is the same model.
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
PRODUCED_BY_KEY = "produced_by"


def _flatten(value, prefix: str = "") -> Dict[str, object]:
    if isinstance(value, dict) and value:
        out: Dict[str, object] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(old: Optional[dict], new: dict) -> str:
    """``"model: "ab12" -> "cd34", decode.max_new_tokens: 48 -> 64"``: the keys whose values differ."""
    if old is None:
        return "it has no record of its setup"
    a, b = _flatten(old), _flatten(new)
    changed = [f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}"
               for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return "changed " + ", ".join(changed) if changed else "its setup differs"


def must_start_afresh(path: os.PathLike | str, stored: Optional[dict], setup: dict, *, holds_results: bool,
                      overwrite: bool, what: str = "written by another setup", redo: str = "start afresh") -> bool:
    """Whether results kept at ``path`` under setup ``stored`` must be discarded before working for ``setup``.

    False when the setups agree or nothing is kept (``holds_results`` false and no recorded setup). When they
    differ: a one-line :class:`DataError` naming what changed, unless ``overwrite``, which warns and returns True.
    One check for every cache of results (prediction stores, grade caches), so none reuses another setup's work.
    """
    if (stored is None and not holds_results) or stored == setup:
        return False
    change = describe_changes(stored, setup)
    if not overwrite:
        raise DataError(f"{path}: {what} ({change}); pass --overwrite to {redo}, or choose another --out")
    logger.warning("%s: %s (%s); --overwrite: discarding it", path, what, change)
    return True


class PredictionStore:
    """``{id: record}`` backed by ``path`` (JSONL). ``records`` holds what is already done, first write wins.

    ``metadata`` (JSON-able dict): the setup that produces the answers; compared with the header of an existing
    file. ``produced_by`` (JSON-able dict): a description written beside it, not compared. ``overwrite``: a
    store written by another setup is emptied and started afresh instead of refused. ``self.metadata`` and
    ``self.produced_by`` are the header's content after opening (``None`` for a file without one).
    """

    def __init__(self, path: os.PathLike | str, metadata: Optional[dict] = None, *,
                 produced_by: Optional[dict] = None, overwrite: bool = False):
        self.path = Path(path)
        self.records: Dict[str, dict] = {}
        self.metadata: Optional[dict] = None
        self.produced_by: Optional[dict] = None
        self._load()
        if metadata is not None:
            metadata = json.loads(json.dumps(metadata))  # as it reads back from the file
            if must_start_afresh(self.path, self.metadata, metadata, holds_results=bool(self.records),
                                 overwrite=overwrite):
                self.path.unlink()
                self.records = {}
            self.metadata = metadata
            self.produced_by = json.loads(json.dumps(produced_by)) if produced_by is not None else None

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
                    self.produced_by = rec.get(PRODUCED_BY_KEY)
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
            header = {METADATA_KEY: self.metadata}
            if self.produced_by is not None:
                header[PRODUCED_BY_KEY] = self.produced_by
            lines.insert(0, json.dumps(header, ensure_ascii=False) + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
