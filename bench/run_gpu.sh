#!/usr/bin/env bash
# The one script a GPU machine runs: install the carried wheels, run the `gpu`-marked tests,
# then bench/train_throughput.py at the three settings below, and print a table last.
#
#   bash bench/run_gpu.sh               # on the GPU machine, with the wheels carried in .whl/
#   bash bench/run_gpu.sh --cpu-smoke   # here: the same steps with --tiny on CPU (exercises the code path)
#
# Before the GPU call (on this machine, once):
#   grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
#   mkdir -p .whl && cp /work/shared/gpu-wheels/*.whl .whl/ && rm .whl/bitsandbytes-*.whl   # QLoRA is not timed
# and call the device tool with carry [".whl"] and a timeout that leaves room for a rerun (e.g. 540 s).
#
# Settings (each in its own process, each bounded by `timeout`, so one failure leaves the others' results):
#   1. LoRA r=128, ZeRO-2, bf16, 224 px: packed (sdpa), packed (flex attention, fixed row length) and padded
#      arms interleaved on the same samples, + batched generation throughput (regions/s)
#   2. LoRA r=128, ZeRO-2, bf16, 336 px: the same three arms, + the largest packed micro-batch that fits
#   3. full fine-tuning, ZeRO-3 + CPU offload, 224 px: steps/s (packed only; torch AdamW on the CPU,
#      so no DeepSpeed C++ op is built on the machine)
# Results: JSON per setting and the table, in bench/results/ (GPU runs only) and in $OUT when it is set.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/bench_gpu.XXXXXX")"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  COMMON=(--tiny --warmup 1 --steps 2)
  PER_SETTING_TIMEOUT=300
else
  PY="${PYTHON:-python3}"
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing carried wheels from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  COMMON=(--warmup 3 --steps 10)
  PER_SETTING_TIMEOUT="${PER_SETTING_TIMEOUT:-240}"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the GPU machine has the repository, not an installed package
"$PY" -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)" || exit 1

echo "== gpu-marked tests"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15
rc=${PIPESTATUS[0]}
# 5: nothing collected (no gpu tests yet, or all deselected on CPU): not a failure of this script.
if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then echo "gpu tests failed (exit $rc); continuing with the benchmarks"; fi

FAILED=()
bench() {  # bench TAG ARGS...: one setting, its own process and time limit
  local tag="$1"; shift
  echo "== setting $tag: ${COMMON[*]} $*"
  timeout "$PER_SETTING_TIMEOUT" "$PY" bench/train_throughput.py "${COMMON[@]}" --tag "$tag" --out "$STAGE/$tag.json" "$@" \
    2> >(grep -v -e FutureWarning -e 'return func' >&2) | tee -a "$STAGE/log.txt" || FAILED+=("$tag")
}

bench lora-z2-224 --image-size 224 --flex-arm --eval-generation
bench lora-z2-336 --image-size 336 --flex-arm --max-microbatch-search
bench fullft-z3offload-224 --image-size 224 --full-ft --zero 3_offload --client-optimizer --skip-baseline

shopt -s nullglob
RESULTS=("$STAGE"/*.json)
if [ "${#RESULTS[@]}" = 0 ]; then echo "no setting produced a result"; exit 1; fi
"$PY" bench/train_throughput.py --summarize "${RESULTS[@]}" > "$STAGE/table.txt"

if [ "$SMOKE" = 0 ]; then
  DAY="$(date +%F)"
  SLUG="$("$PY" -c "import json,re,sys; d=json.load(open(sys.argv[1]))['device']; print(re.sub('[^a-z0-9]+','-',d.lower()).strip('-')[:48])" "${RESULTS[0]}")"
  for f in "${RESULTS[@]}"; do cp "$f" "bench/results/${DAY}_${SLUG}_$(basename "$f")"; done
  cp "$STAGE/table.txt" "bench/results/${DAY}_${SLUG}_table.txt"
fi
if [ -n "${OUT:-}" ]; then cp "${RESULTS[@]}" "$STAGE/table.txt" "$STAGE/log.txt" "$OUT"/ 2>/dev/null || true; fi

[ "${#FAILED[@]}" -gt 0 ] && echo "settings that failed or timed out: ${FAILED[*]} (see the log above)"
echo "== summary"
cat "$STAGE/table.txt"
[ "${#FAILED[@]}" = 0 ]
