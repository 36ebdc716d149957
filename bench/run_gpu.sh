#!/usr/bin/env bash
# The one script a GPU machine runs: install the carried wheels, run every `gpu`-marked test (bench/gpu_check.py),
# then the training- and evaluation-throughput settings below, within one time budget, and print a table last.
#
#   bash bench/run_gpu.sh                        # on the GPU machine, with the wheels carried in .whl/
#   bash bench/run_gpu.sh --cpu-smoke            # here: the same steps with --tiny on CPU (exercises the code path)
#   bash bench/run_gpu.sh --no-gpu-check --only accum4-224,compile-224   # a follow-up call: only these settings
#
# Before the GPU call (on this machine, once):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d /tmp/liger liger-kernel==0.8.5
#   python bench/prepare_gpu_wheels.py --from ../shared/gpu-wheels --liger /tmp/liger   # .whl/ (git ignores it), ~26 MiB
# and call the device tool with carry [".whl"] and timeout_s 600.
#
# Time: the device tool allows 600 s per call, so the script keeps to BUDGET_S (default 570 s) from its start:
# the gpu check gets at most GPU_CHECK_S (230 s); then the settings run in the order below, each in its own process
# with its own time limit, clipped to what is left; a setting that would get less than MIN_SETTING_S (75 s) is
# skipped and named at the end with the command that runs it. One failure or timeout leaves the others' results.
# Every limit is an environment variable (BUDGET_S, GPU_CHECK_S, MIN_SETTING_S, T_LEVERS, T_EVAL, T_336, T_ZERO1,
# T_COMPILE, T_SEARCH, T_ACCUM, T_TORCH, SEARCH_MEMORY_GB; EVAL_EXTRA adds arguments of bench/eval_throughput.py; GPU_CHECK_K selects gpu tests as
# pytest's -k does), so a short lease can run the same script with a smaller budget.
#
# Settings (7B shapes, random bf16 weights, LoRA r=128 on every LLM linear + region encoder and projector trained,
# micro-batches filled to 3072 tokens, >= 20 timed steps per arm, arms interleaved on one engine):
#   levers-224     ZeRO-2, 224 px: padded baseline | packed | +LoRA dropout 0 | +Liger | +channels-last | +DeepSpeed sync-free
#                  | +varlen attention (model.attn_implementation=torch_varlen) | +ZeRO without contiguous gradients (one GPU)
#   search-224     the largest data.pack_tokens that fits an 80 GB card (SEARCH_MEMORY_GB, default 84 GB of allocations),
#                  without activation checkpointing, with it on one decoder layer in 2 (model.checkpoint_every=2),
#                  and on every layer (every lever); a search still running 25 s before its limit stops and is written
#   accum4-224     ZeRO-2, 224 px, 4 micro-batches per optimizer step (train.gradient_accumulation_steps=4: GPT4RoI's
#                  global batch of 16 samples on one GPU): every lever | + ZeRO without contiguous gradients; each timed
#                  step is 4 micro-batches (compare tokens/s with levers-224's sync_free and nocontig arms)
#   torch-224      224 px, the trainer's train.engine=torch (--engine torch: no DeepSpeed, fp32 masters, multi-tensor
#                  clip, fused AdamW): every lever that is not DeepSpeed's | + varlen (compare with
#                  levers-224's sync_free and varlen arms: whether DeepSpeed's per-tensor bookkeeping costs step time)
#   eval-224       evaluation: VG captioning regions/s, fast (static cache, compiled step) vs eager, 7B shapes
#   levers-336     ZeRO-2, 336 px: padded baseline | packed | packed with every lever above | the same + varlen
#   zero1-224      ZeRO-1, 224 px: packed with every lever (compare with the same arm of levers-224)
#   compile-224    ZeRO-2, 224 px: every lever, without and with regional torch.compile (+ varlen, + ds_nocontig)
#   torch-compile-224  train.engine=torch with regional compile (+ varlen): the two host levers together, the
#                  lightest host load of a step on offer (compare with compile-224 and torch-224)
#   search-336     as search-224, at 336 px
#   zero1-nocontig-224  ZeRO-1 without contiguous gradients (no gradient hooks at all on one GPU), every lever
# Results: one JSON per setting and the table, in bench/results/<date>_<gpu>_<tag>.json (GPU runs only) and in $OUT.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SMOKE=0 GPU_CHECK=1 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --no-gpu-check) GPU_CHECK=0 ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: bash bench/run_gpu.sh [--cpu-smoke] [--no-gpu-check] [--only TAG,TAG]" >&2; exit 2 ;;
  esac
  shift
done
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/bench_gpu.XXXXXX")"
mkdir -p "$STAGE/train" "$STAGE/eval"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # the tiny model: samples of 120-320 tokens, so budgets and rows shrink with them; 2 timed steps per arm
  COMMON=(--tiny --warmup 1 --steps 2 --pack-tokens 1024 --pack-length 512)
  BIG=2048 SEARCH=(--search-limit 2048 --pack-length 512) COMPILE_WARMUP=(--warmup 2 --steps 1)
  LIGER=""  # Liger needs CUDA: only levers-224's own liger arm runs (and is dropped with its reason)
  BUDGET_S="${BUDGET_S:-1500}" GPU_CHECK_S="${GPU_CHECK_S:-120}" MIN_SETTING_S="${MIN_SETTING_S:-60}"
  T_LEVERS=240 T_336=200 T_ZERO1=200 T_COMPILE=600 T_SEARCH=200 T_ACCUM=200 T_TORCH=200 T_EVAL=300 EVAL_ARGS=(--tiny)
else
  PY="${PYTHON:-python3}"
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing carried wheels from .whl/"
    for wheel in .whl/*.whl; do  # one at a time: a broken optional wheel costs its own arms, not the whole call
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" && continue
      case "$(basename "$wheel")" in
        liger_kernel-*|bitsandbytes-*) echo "note: $(basename "$wheel") did not install; the arms that need it are dropped" ;;
        *) echo "error: $(basename "$wheel") did not install" >&2; exit 1 ;;
      esac
    done
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # 3072 tokens per micro-batch in one row: the padded baseline of the same samples (~4 samples padded to the
  # longest, ~10 MB of activations per token without levers) still fits an 80 GB card; larger budgets are the
  # search settings' (rows of 2048 there, as data.max_length makes them in training)
  COMMON=(--warmup 3 --steps 20 --pack-tokens 3072 --pack-length 3072)
  # the searches answer for an 80 GB H100 whatever card runs them (79.1 GiB = 84.9 GB, ~0.5 GB of it CUDA's context)
  BIG=8192 SEARCH=(--search-limit 131072 --pack-length 2048 --search-memory-gb "${SEARCH_MEMORY_GB:-84}") COMPILE_WARMUP=(--warmup 4 --steps 20)
  LIGER="+liger"
  BUDGET_S="${BUDGET_S:-570}" GPU_CHECK_S="${GPU_CHECK_S:-230}" MIN_SETTING_S="${MIN_SETTING_S:-75}"
  T_LEVERS="${T_LEVERS:-200}" T_336="${T_336:-140}" T_ZERO1="${T_ZERO1:-100}" T_COMPILE="${T_COMPILE:-200}"
  T_SEARCH="${T_SEARCH:-200}" T_ACCUM="${T_ACCUM:-150}" T_TORCH="${T_TORCH:-120}" T_EVAL="${T_EVAL:-180}"
  read -r -a EVAL_ARGS <<< "--repeats 2 ${EVAL_EXTRA:-}"  # EVAL_EXTRA="--regions 512": a shorter evaluation arm
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the GPU machine has the repository, not an installed package
"$PY" -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)" || exit 1
"$PY" -c "import liger_kernel" 2>/dev/null || echo "note: liger-kernel is not installed; arms with the liger lever will be dropped"

left() { echo $(( BUDGET_S - SECONDS )); }  # SECONDS counts from the script's start
CHECK_OUT="$STAGE/check"; [ "$SMOKE" = 0 ] && CHECK_OUT="bench/results"
mkdir -p "$CHECK_OUT"
FAILED=() SKIPPED=()
wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
keep() { [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ 2>/dev/null; return 0; }  # each result reaches $OUT once written

if [ "$GPU_CHECK" = 1 ]; then
  t=$(( $(left) < GPU_CHECK_S ? $(left) : GPU_CHECK_S ))
  echo "== gpu-marked tests (bench/gpu_check.py, up to ${t} s)"
  SELECT=(); [ -n "${GPU_CHECK_K:-}" ] && SELECT=(-- -k "$GPU_CHECK_K")  # GPU_CHECK_K: pytest -k, to rerun some tests
  "$PY" bench/gpu_check.py --timeout "$t" --out "$CHECK_OUT" "${SELECT[@]}" 2>&1 | tail -60
  rc=${PIPESTATUS[0]}
  # On a CPU every gpu test skips, which gpu_check reports as not passed: expected in the smoke run.
  if [ "$rc" != 0 ]; then echo "gpu check did not pass (exit $rc; CPU runs skip every gpu test); continuing with the benchmarks"; fi
  keep "$CHECK_OUT"/*_gpu_check.json
fi

setting() {  # setting TAG TIMEOUT ARGS...: one train_throughput run, its own process and time limit
  local tag="$1" limit="$2"; shift 2
  wanted "$tag" || return 0
  local t=$(( $(left) - 10 )); [ "$t" -gt "$limit" ] && t="$limit"
  if [ "$t" -lt "$MIN_SETTING_S" ]; then SKIPPED+=("$tag"); echo "== setting $tag skipped: ${t} s left of the budget"; return 0; fi
  echo "== setting $tag (up to ${t} s): ${COMMON[*]} $*"
  # --time-limit-s: a budget search still running near the limit stops and writes what it found
  timeout "$t" "$PY" bench/train_throughput.py "${COMMON[@]}" --tag "$tag" --out "$STAGE/train/$tag.json" \
    --time-limit-s $(( t > 60 ? t - 25 : t * 2 / 3 )) "$@" \
    2> >(grep -v -e FutureWarning -e 'return func' -e 'warnings.warn' >&2) | tee -a "$STAGE/log.txt" || FAILED+=("$tag")
  keep "$STAGE/train/$tag.json"
}

# ---- evaluation throughput -----------------------------------------------------------------------------------
# bench/eval_throughput.py: fast vs eager decoding of VG captioning through the harness' own code (7B shapes);
# its JSON goes under "$STAGE/eval/" (the training table reads only "$STAGE/train/").
eval_throughput() {
  local tag=eval-224
  wanted "$tag" || return 0
  local t=$(( $(left) - 10 )); [ "$t" -gt "$T_EVAL" ] && t="$T_EVAL"
  if [ "$t" -lt "$MIN_SETTING_S" ]; then SKIPPED+=("$tag"); echo "== setting $tag skipped: ${t} s left of the budget"; return 0; fi
  echo "== setting $tag (up to ${t} s): bench/eval_throughput.py ${EVAL_ARGS[*]}"
  timeout "$t" "$PY" bench/eval_throughput.py "${EVAL_ARGS[@]}" --out "$STAGE/eval/eval.json" \
    2> >(grep -v -e FutureWarning -e 'return func' -e 'warnings.warn' >&2) | tee -a "$STAGE/log.txt" || FAILED+=("$tag")
  keep "$STAGE/eval/eval.json"
}

PLAIN=(--arm baseline=padded --arm packed=packed)
EVERY="packed+nodrop$LIGER+channels_last+ds_sync_free"
SEARCH_LEVERS="nodrop$LIGER+channels_last"
setting levers-224 "$T_LEVERS" --image-size 224 --profile-busy "${PLAIN[@]}" --arm nodrop=packed+nodrop --arm liger=packed+nodrop+liger \
  --arm channels_last="packed+nodrop$LIGER+channels_last" --arm sync_free="$EVERY" --arm varlen="$EVERY+varlen" \
  --arm nocontig="$EVERY+varlen+ds_nocontig"
setting search-224 "$T_SEARCH" --image-size 224 --arm every="$EVERY" --arm every_big="$EVERY@$BIG" \
  --max-budget-search --search-levers "$SEARCH_LEVERS" --search-checkpointing off,2,1 "${SEARCH[@]}"
setting accum4-224 "$T_ACCUM" --image-size 224 --grad-accum 4 --warmup 2 --skip-baseline --arm every="$EVERY" \
  --arm nocontig="$EVERY+ds_nocontig"
setting torch-224 "$T_TORCH" --image-size 224 --engine torch --skip-baseline --arm every="packed+nodrop$LIGER+channels_last" \
  --arm varlen="packed+nodrop$LIGER+channels_last+varlen"
eval_throughput
setting levers-336 "$T_336" --image-size 336 "${PLAIN[@]}" --arm every="$EVERY" --arm varlen="$EVERY+varlen"
setting zero1-224 "$T_ZERO1" --image-size 224 --zero 1 --arm every="$EVERY"
setting compile-224 "$T_COMPILE" --image-size 224 --arm every="$EVERY" --arm compiled="$EVERY+compile" \
  --arm compiled_varlen="$EVERY+varlen+compile" --arm compiled_all="$EVERY+varlen+ds_nocontig+compile" "${COMPILE_WARMUP[@]}"
setting torch-compile-224 "$T_COMPILE" --image-size 224 --engine torch --skip-baseline \
  --arm compiled="packed+nodrop$LIGER+channels_last+compile" --arm compiled_varlen="packed+nodrop$LIGER+channels_last+varlen+compile" \
  "${COMPILE_WARMUP[@]}"
setting search-336 "$T_SEARCH" --image-size 336 --arm every="$EVERY" --max-budget-search --search-levers "$SEARCH_LEVERS" \
  --search-checkpointing off,2,1 "${SEARCH[@]}"
setting zero1-nocontig-224 "$T_ZERO1" --image-size 224 --zero 1 --ds-override zero_optimization.contiguous_gradients=false \
  --arm every="$EVERY"


shopt -s nullglob
RESULTS=("$STAGE"/train/*.json)
EVALS=("$STAGE"/eval/*.json)
if [ "${#RESULTS[@]}" = 0 ] && [ "${#EVALS[@]}" = 0 ]; then echo "no setting produced a result"; exit 1; fi
touch "$STAGE/table.txt"
[ "${#RESULTS[@]}" = 0 ] || "$PY" bench/train_throughput.py --summarize "${RESULTS[@]}" > "$STAGE/table.txt"

if [ "$SMOKE" = 0 ]; then
  DAY="$(date +%F)"
  FIRST=("${RESULTS[@]}" "${EVALS[@]}")
  SLUG="$("$PY" -c "import json,re,sys; d=json.load(open(sys.argv[1]))['device']; print(re.sub('[^a-z0-9]+','-',d.lower()).strip('-')[:48])" "${FIRST[0]}")"
  for f in "${RESULTS[@]}" "${EVALS[@]}"; do cp "$f" "bench/results/${DAY}_${SLUG}_$(basename "$f")"; done
  # bench/results/<date>_<gpu>_eval.json carries regions_per_s
  cp "$STAGE/table.txt" "bench/results/${DAY}_${SLUG}_table.txt"
fi
if [ -n "${OUT:-}" ]; then
  cp "${RESULTS[@]}" "${EVALS[@]}" "$STAGE/table.txt" "$STAGE/log.txt" "$OUT"/ 2>/dev/null || true
  cp "$CHECK_OUT"/"$(date +%F)"_*_gpu_check.json "$OUT"/ 2>/dev/null || true
fi

[ "${#FAILED[@]}" -gt 0 ] && echo "settings that failed or timed out: ${FAILED[*]} (see the log above)"
if [ "${#SKIPPED[@]}" -gt 0 ]; then
  list="$(IFS=,; echo "${SKIPPED[*]}")"
  echo "settings skipped for time: ${SKIPPED[*]}; run them with: bash bench/run_gpu.sh --no-gpu-check --only $list"
fi
echo "== summary"
cat "$STAGE/table.txt"
for f in "${RESULTS[@]}"; do "$PY" - "$f" <<'PY'
import json, sys
sys.path.insert(0, ".")
from bench.throughput.report import format_table
print()
print(format_table(json.load(open(sys.argv[1]))))
PY
done
for f in "${EVALS[@]}"; do "$PY" - "$f" <<'PY'
import json, sys
sys.path.insert(0, ".")
from bench.eval_throughput import format_table
print()
print(format_table(json.load(open(sys.argv[1]))))
PY
done
[ "${#FAILED[@]}" = 0 ]
