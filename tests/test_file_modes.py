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
