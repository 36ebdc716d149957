"""Shared fixtures: one tiny model and one synthetic Pix2Cap-format dataset per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from quickstart.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def synthetic_pix2cap(tmp_path_factory) -> dict:
    """Synthetic Pix2Cap-COCO files (40 train / 8 val images) and the converted training JSONL."""
    root = tmp_path_factory.mktemp("synthetic")
    data = root / "data"
    run = [sys.executable, "-m"]
    subprocess.run(run + ["data_converters.synthetic", "--out", str(data), "--train-images", "40", "--val-images", "8", "--seed", "0"],
                   check=True, cwd=REPO, capture_output=True)
    train = root / "train.jsonl"
    subprocess.run(run + ["data_converters.pix2cap", "--annotations", str(data / "annotations" / "pix2cap_coco_train.json"),
                          "--out", str(train)], check=True, cwd=REPO, capture_output=True)
    return {"root": data, "train": train, "vg_test": data / "annotations" / "test_caption.json"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_converter(tmp_path, module: str, data, *args: str, name: str = "input.json"):
    """Run ``python -m data_converters.<module>`` on ``data`` (a JSON-able object or raw text).

    Returns (process, records or None, stats or None).
    """
    import json

    src = tmp_path / name
    src.write_text(data if isinstance(data, str) else json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", f"data_converters.{module}", "--annotations", str(src),
                           "--out", str(out), "--stats", str(stats), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    records = None
    if proc.returncode == 0:
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return proc, records, (json.loads(stats.read_text()) if stats.exists() else None)
