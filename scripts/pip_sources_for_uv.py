"""pip's configured package sources as ``uv pip install`` arguments, one per line.

``scripts/setup_env.sh`` installs with uv (the same resolution in a third of pip's time on 2 cores), but uv reads
no pip configuration: a mirror, local wheels or a constraints file set for pip (``pip.conf``, ``PIP_*``
variables) would be ignored and uv would resolve elsewhere. ``pip config list`` prints pip's merged settings
(variables as ``:env:.key``, files as ``install.key`` / ``global.key``); each source is passed on with pip's
precedence, and uv's ``unsafe-best-match`` takes the best version across all indexes as pip does.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Dict, List

UV_FLAGS = {"index-url": "--default-index", "extra-index-url": "--index", "find-links": "--find-links",
            "constraint": "--constraints"}
SECTIONS = (":env:", "install", "global")  # pip's precedence: PIP_* variables, then [install], then [global]


def uv_arguments(pip_config_list: str) -> List[str]:
    """The uv arguments of ``pip config list``'s output."""
    found: Dict[str, Dict[str, str]] = {}
    for line in pip_config_list.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.strip().rpartition(".")
        if sep and key in UV_FLAGS and section in SECTIONS:
            found.setdefault(key, {})[section] = value.strip().strip("'\"")
    args = ["--index-strategy", "unsafe-best-match"]
    for key, flag in UV_FLAGS.items():
        by_section = found.get(key, {})
        chosen = next((by_section[s] for s in SECTIONS if s in by_section), "")
        for value in chosen.split():
            args += [flag, value]
    return args


def main() -> int:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    print("\n".join(uv_arguments(listed.stdout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
