"""Outputs honour the umask: colleagues on a shared cluster can read what a run wrote."""

import os
import stat

import pytest

from gpt4roi_sft.atomic import atomic_open, current_umask, write_json_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_0644_under_umask_022_also_when_replacing(tmp_path, umask_022):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})
    assert mode(target) == 0o644
    with atomic_open(target, "wb") as fh:
        fh.write(b"{}")
    assert mode(target) == 0o644


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        write_json_atomic(tmp_path / "private.json", {})
        assert current_umask() == 0o077
    finally:
        os.umask(old)
    assert mode(tmp_path / "private.json") == 0o600


def test_checkpoint_weights_are_0644_under_umask_022(tmp_path, umask_022):
    import torch

    from gpt4roi_sft.train.checkpoint import TRAINABLE_FILE, save_trainable

    save_trainable(tmp_path, {"w": torch.ones(2)})  # safetensors itself creates 0600 files
    assert mode(tmp_path / TRAINABLE_FILE) == 0o644


def test_a_built_model_directory_is_readable_by_others_under_umask_022(tmp_path, umask_022):
    from quickstart.tiny_model import build_tiny_model

    out = build_tiny_model(tmp_path / "tiny")
    modes = {p.name: mode(p) for p in (tmp_path / "tiny").iterdir()}
    assert modes["model.safetensors"] == 0o644 and mode(out) == 0o755
    assert {name for name, m in modes.items() if m not in (0o644, 0o755)} == set()


def test_directory_tree_helper_gives_files_0644_and_folders_0755(tmp_path, umask_022):
    from gpt4roi_sft.atomic import apply_default_modes_under

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f").write_text("x")
    os.chmod(tmp_path / "d" / "sub" / "f", 0o600)
    os.chmod(tmp_path / "d" / "sub", 0o700)
    apply_default_modes_under(tmp_path / "d")
    assert (mode(tmp_path / "d" / "sub"), mode(tmp_path / "d" / "sub" / "f")) == (0o755, 0o644)
