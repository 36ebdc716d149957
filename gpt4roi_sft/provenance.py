"""Fingerprints of what produced a result: model directories and input files, cheap enough to take every run.

Results (prediction stores, grade caches, reports) record the fingerprints of the model (and adapter) that
produced them, so a resumed run can refuse to mix the answers of two models and a report can say which
checkpoint it measured.

The rule for a model directory (:func:`weights_fingerprint`), every regular file under it, hidden names
excepted, by relative path:

- ``*.safetensors``: the file size, the JSON header (tensor names, dtypes, shapes, offsets, metadata) and the
  first and last 4 KiB of every tensor's data. Training moves every element of a tensor it updates (and the
  rows of new tokens sit at the end of an embedding), so a retrained model, or one exported from another
  checkpoint, changes the fingerprint, while reading stays a few MiB even for a 7B model (two short reads
  per tensor, never the gigabytes of weights);
- any other file up to 64 MiB (``config.json``, ``*.safetensors.index.json``, tokenizer and processor files,
  ``export_info.json``): its whole content;
- a larger other file (``*.bin``, ``*.pt``): its size and its first and last MiB.

Nothing depends on modification times or on where the directory lives, so a copied or moved model keeps its
fingerprint, and exporting the same checkpoint twice gives the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Optional, Union

from gpt4roi_sft.errors import ConfigError

PathLike = Union[str, os.PathLike]

TENSOR_EDGE_BYTES = 4096
WHOLE_FILE_LIMIT = 64 << 20
EDGE_BYTES = 1 << 20
EXPORT_INFO_FILE = "export_info.json"
FINGERPRINT_CHARS = 16


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a whole file (test files, annotation files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_safetensors(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            digest.update(raw)
            return
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:  # not a safetensors file after all: hash what is there
            fh.seek(0)
            digest.update(fh.read(EDGE_BYTES))
            return
        header = fh.read(header_len)
        digest.update(header)
        try:
            entries = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        data_start = 8 + header_len
        for name in sorted(k for k in entries if k != "__metadata__"):
            offsets = entries[name].get("data_offsets") if isinstance(entries[name], dict) else None
            if not offsets or len(offsets) != 2:
                continue
            begin, end = int(offsets[0]), int(offsets[1])
            length = max(0, end - begin)
            fh.seek(data_start + begin)
            digest.update(fh.read(min(TENSOR_EDGE_BYTES, length)))
            tail = min(TENSOR_EDGE_BYTES, length - TENSOR_EDGE_BYTES)
            if tail > 0:
                fh.seek(data_start + end - tail)
                digest.update(fh.read(tail))


def _hash_other(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            return
        digest.update(fh.read(EDGE_BYTES))
        fh.seek(size - EDGE_BYTES)
        digest.update(fh.read(EDGE_BYTES))


def weights_fingerprint(model_dir: PathLike, what: str = "model") -> str:
    """A short hex fingerprint of a model (or adapter) directory, by the rule in the module docstring.

    ``what`` names the option in the error raised when the directory does not exist.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"--{what} {model_dir}: directory not found")
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ConfigError(f"--{what} {model_dir}: the directory is empty")
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.suffix == ".safetensors":
            _hash_safetensors(path, digest)
        else:
            _hash_other(path, digest)
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def export_info(model_dir: PathLike) -> Optional[dict]:
    """What ``gpt4roi_sft.export`` recorded about the checkpoint a directory was exported from, if it was."""
    path = Path(model_dir) / EXPORT_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def describe_model(model_dir: Optional[PathLike], what: str = "model") -> Optional[dict]:
    """``{"path", "fingerprint", "step", "checkpoint"}`` of a model directory (``step`` and ``checkpoint``
    from its export record, ``None`` for a directory that was not exported from a training checkpoint)."""
    if model_dir is None:
        return None
    info = export_info(model_dir) or {}
    return {"path": str(model_dir), "fingerprint": weights_fingerprint(model_dir, what),
            "step": info.get("step"), "checkpoint": info.get("checkpoint")}
