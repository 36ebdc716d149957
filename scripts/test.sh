#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the pytest suite (CPU; `gpu`-marked tests are skipped).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k label_mask`.
# TEST_WORKERS (default 2) pytest-xdist workers share the tests: many of them wait on subprocesses (DeepSpeed
# launches, evaluation CLIs), so two workers finish the suite in about three quarters of the time even on two cores;
# Tests sharing a module-scoped fixture stay on one worker (tests/conftest.py groups them), so an expensive fixture
# (a training run, an export) is built once. TEST_WORKERS=0 runs it in this one process (then `-x`, `--pdb` and print debugging behave as usual).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
WORKERS=()
if [ "${TEST_WORKERS:-2}" != 0 ] && python -c "import xdist" 2>/dev/null; then
  WORKERS=(-n "${TEST_WORKERS:-2}" --dist loadgroup)
fi
set +e
python -m pytest "${WORKERS[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$rc"
