"""The suite's own scheduling: tests sharing a module-scoped fixture run on one pytest-xdist worker."""

import subprocess
import sys
import textwrap

from conftest import REPO


def test_tests_sharing_a_module_fixture_build_it_once_across_two_workers(tmp_path):
    # A fixture built on both workers costs the suite a training run per worker (tests/test_train.py's shared runs).
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("suite_conftest", {str(REPO / "tests" / "conftest.py")!r})
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        pytest_collection_modifyitems = suite.pytest_collection_modifyitems
    """))
    builds = tmp_path / "builds.txt"
    (tmp_path / "test_shared.py").write_text(textwrap.dedent(f"""
        import os
        import pytest

        @pytest.fixture(scope="module")
        def run():
            with open({str(builds)!r}, "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

        @pytest.fixture
        def exported(run):
            return run
    """) + "".join(f"\ndef test_{i}({'exported' if i % 3 == 0 else 'run' if i % 2 else 'tmp_path'}):\n    pass\n"
                   for i in range(8)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider",
                           "-W", "error::pytest.PytestWarning", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 passed" in proc.stdout
    assert len(builds.read_text().splitlines()) == 1, builds.read_text()
