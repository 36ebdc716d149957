#!/usr/bin/env bash
# Creates .venv from the repo's own files (pyproject.toml) and installs the project into it, then puts
# .venv/bin first on PATH. Fast when already set up: the install is skipped while pyproject.toml is unchanged.
#
#   source scripts/setup_env.sh     # in your shell: afterwards `python -m ...` uses .venv (changes no shell option)
#   bash scripts/setup_env.sh       # only create / update .venv
#
# GPT4ROI_VENV=DIR puts the environment elsewhere; GPT4ROI_VENV=system uses the Python already on PATH as it is
# (a cluster module or a container that has the dependencies), creating nothing. GPT4ROI_INSTALLER=pip installs
# with pip alone (default: uv, from pip's configured indexes, wheels and constraints; pip where uv fails).
# The work runs in a subshell with strict options, so sourcing this file leaves the caller's shell options alone.

_gpt4roi_setup() (
  set -euo pipefail
  ROOT="$1"
  VENV="$2"
  PY="${PYTHON:-python3}"
  EXTRAS="${GPT4ROI_EXTRAS:-dev,qlora}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  STAMP="$VENV/.gpt4roi_sft.stamp"
  WANT="$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1) $EXTRAS"
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing gpt4roi_sft[$EXTRAS] into $VENV (about a minute the first time)"
    LOG="$VENV/install.log"
    "$VENV/bin/python" -m pip install -q --upgrade pip >"$LOG" 2>&1 || true
    # uv resolves and installs the same packages in about a third of pip's time (1 min against 2.5 on 2 cores),
    # from pip's own configured sources; pip installs where uv cannot be had or fails.
    install_with_uv() {
      "$VENV/bin/python" -m pip install -q uv >>"$LOG" 2>&1 || return 1
      local listed
      listed="$("$VENV/bin/python" "$ROOT/scripts/pip_sources_for_uv.py" 2>>"$LOG")" || return 1
      local -a sources
      mapfile -t sources <<<"$listed"
      "$VENV/bin/python" -m uv pip install -q --python "$VENV/bin/python" --compile-bytecode "${sources[@]}" \
        -e "$ROOT[$EXTRAS]" >>"$LOG" 2>&1
    }
    if [ "${GPT4ROI_INSTALLER:-uv}" = uv ] && install_with_uv; then
      :
    else
      [ "${GPT4ROI_INSTALLER:-uv}" = uv ] && echo "[setup] uv did not install (see $LOG); installing with pip"
      if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" >>"$LOG" 2>&1; then
        echo "[setup] pip install failed; the end of $LOG:" >&2
        tail -n 30 "$LOG" >&2
        exit 1
      fi
    fi
    echo "$WANT" > "$STAMP"
  fi
)

_GPT4ROI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${GPT4ROI_VENV:-}" = "system" ]; then
  export PYTHONPATH="$_GPT4ROI_ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  _GPT4ROI_VENV="${GPT4ROI_VENV:-$_GPT4ROI_ROOT/.venv}"
  if _gpt4roi_setup "$_GPT4ROI_ROOT" "$_GPT4ROI_VENV"; then
    export VIRTUAL_ENV="$_GPT4ROI_VENV"
    export PATH="$_GPT4ROI_VENV/bin:$PATH"
    # DeepSpeed JIT-compiles its C++/CUDA ops (CPU Adam for offload, fused Adam, ...) at first use into one folder
    # per user; the environment's own, so that another environment (or the system ninja, when .venv is not on
    # PATH) does not overwrite a build and make the next launch compile it again.
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_GPT4ROI_VENV/torch_extensions}"
  else
    unset -f _gpt4roi_setup
    # `return` when sourced, `exit` when run as a script.
    return 1 2>/dev/null || exit 1
  fi
fi
unset -f _gpt4roi_setup
unset _GPT4ROI_ROOT _GPT4ROI_VENV
