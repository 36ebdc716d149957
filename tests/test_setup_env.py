"""scripts/setup_env.sh is safe to source: it changes no option of the caller's shell, and a failure returns."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_env.sh"


def interactive_bash(body: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_sourcing_changes_no_shell_option_and_a_failing_command_afterwards_keeps_the_shell(tmp_path):
    proc = interactive_bash(f'before="$(set +o; shopt -p)"; source "{SCRIPT}"; after="$(set +o; shopt -p)"; '
                            f'[ "$before" = "$after" ] && echo "options unchanged"; false; echo "shell alive"',
                            GPT4ROI_VENV="system")
    assert proc.stdout.splitlines() == ["options unchanged", "shell alive"], proc.stdout + proc.stderr


def test_a_failed_setup_returns_an_error_and_leaves_the_options_alone(tmp_path):
    proc = interactive_bash(f'before="$(set +o)"; source "{SCRIPT}"; echo "status $?"; after="$(set +o)"; '
                            f'[ "$before" = "$after" ] && echo "options unchanged"; echo "shell alive"',
                            GPT4ROI_VENV=str(tmp_path / "venv"), PYTHON="false")
    assert proc.stdout.splitlines()[-3:] == ["status 1", "options unchanged", "shell alive"], proc.stdout + proc.stderr


def test_system_mode_puts_the_checkout_on_the_python_path():
    proc = interactive_bash(f'source "{SCRIPT}"; echo "$PYTHONPATH"', GPT4ROI_VENV="system", PYTHONPATH="")
    assert proc.stdout.strip().split(":")[0] == str(REPO)


def test_the_environment_keeps_its_own_compiled_extensions_unless_told_otherwise():
    """DeepSpeed's JIT-compiled ops go to TORCH_EXTENSIONS_DIR; one shared folder would be rebuilt each time
    another environment (or ninja) used it last."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "GPT4ROI_VENV")}
    body = f'source "{SCRIPT}" >/dev/null && echo "$TORCH_EXTENSIONS_DIR"'
    proc = subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=600, env=env)
    assert proc.stdout.strip() == str(REPO / ".venv" / "torch_extensions"), proc.stdout + proc.stderr
    proc = subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=600,
                          env={**env, "TORCH_EXTENSIONS_DIR": "/elsewhere"})
    assert proc.stdout.strip() == "/elsewhere", proc.stdout + proc.stderr


def test_uv_installs_from_the_package_sources_pip_is_configured_with():
    """A mirror, local wheels or constraints set for pip reach uv, with pip's precedence (PIP_* variables over
    the [install] section over [global]) and pip's best match across indexes."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from pip_sources_for_uv import uv_arguments

    listed = "\n".join([
        ":env:.find-links='/opt/wheels'",
        ":env:.default-timeout='180'",
        "global.find-links='/ignored/because/of/the/variable'",
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/more/simple'",
        "global.index-url='https://mirror.example/simple'",
        "install.index-url='https://install.example/simple'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
    ])
    assert uv_arguments(listed) == [
        "--index-strategy", "unsafe-best-match",
        "--default-index", "https://install.example/simple",
        "--index", "file:///opt/pypi/simple", "--index", "file:///opt/more/simple",
        "--find-links", "/opt/wheels",
        "--constraints", "/etc/xdg/pip/constraints.txt",
    ]
    assert uv_arguments("") == ["--index-strategy", "unsafe-best-match"]  # no pip configuration: uv's defaults
