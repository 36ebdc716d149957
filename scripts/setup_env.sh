#!/usr/bin/env bash
# Creates .venv from the repo's own files (pyproject.toml) and installs the project into it.
# Fast when already set up: the install is skipped while pyproject.toml is unchanged.
# Usage: source scripts/setup_env.sh   (or bash scripts/setup_env.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GPT4ROI_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${GPT4ROI_EXTRAS:-dev,qlora}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.gpt4roi_sft.stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing gpt4roi_sft[$EXTRAS] into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
