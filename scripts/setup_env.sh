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
  LOG="$VENV/install.log"
  "$VENV/bin/python" -m pip install -q --upgrade pip >"$LOG" 2>&1 || true
  if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" >>"$LOG" 2>&1; then
    echo "[setup] pip install failed; the end of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
