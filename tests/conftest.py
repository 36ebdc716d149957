"""Shared fixtures: one tiny model and one synthetic Pix2Cap-format dataset per test session."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def group_tests_by_shared_module_fixtures(items):
    """Tests that share a module-scoped fixture (a training run, an export, a converted release) form one
    pytest-xdist group, so under ``--dist loadgroup`` (scripts/test.sh) that fixture is built on one worker instead
    of once on each. A group is a connected set of tests over their shared module fixtures, named after one of
    them; a test marked ``xdist_group`` by hand keeps its mark."""
    parent = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        keys = [f"{item.module.__name__}.{name}" for name, fixturedefs in sorted(defs.items())
                if fixturedefs and fixturedefs[-1].scope == "module"]
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
        if keys:
            shared[item] = keys[0]
    for item, key in shared.items():
        item.add_marker(pytest.mark.xdist_group(root(key)))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Groups the tests before pytest-xdist reads the groups and puts the ``slow`` ones (multi-process runs, whose
    groups take minutes) first, so the workers share out the short tests at the end instead of one worker
    finishing a long group alone; then checks that xdist applied the groups: it marks a grouped
    test by suffixing its node id, which a pytest with structured node ids ignores (9.2 with pytest-xdist 3.8.0,
    pytest-dev/pytest-xdist#1386), and the groups are then spread silently."""
    group_tests_by_shared_module_fixtures(items)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # long runs first: no lone one at the end
    result = yield
    if getattr(config.option, "loadgroup", False):
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            warnings.warn(pytest.PytestWarning(
                f"pytest {pytest.__version__} dropped the xdist_group of {len(lost)} tests (e.g. {lost[0]}): each "
                f"worker builds their shared fixtures; use the pytest pinned in pyproject.toml"))
    return result


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


def run_module(module: str, *args: str, process: bool = False, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>``: by default run in this process, the module's ``main`` under ``run_cli`` as its
    ``__main__`` block runs it (the same exit code and one-line errors), with what it prints captured; with
    ``process``, started as a real process in the checkout (``env``, ``timeout`` apply there).

    A new process spends ~10 s of CPU importing torch, transformers and peft before it does anything; the tests of
    a command's behaviour run it here, and each command keeps a test that starts it as a real process.
    """
    if process:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    import contextlib
    import importlib
    import io

    from gpt4roi_sft.errors import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = run_cli(importlib.import_module(module).main, list(args))
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess([module, *args], rc, out.getvalue(), err.getvalue())


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
