#!/usr/bin/env bash
# VG region captioning (GLaMM's protocol): generate, then score with pycocoevalcap.
# Usage: bash scripts/eval_vg.sh --model DIR --annotations FILE --image-root DIR --out DIR
#          [--adapter DIR] [--batch-size N|auto] [--eager] [--max-new-tokens N] [--spice-jars DIR] [--prompt STR]
#          [--template gpt4roi_v0] [--do-sample --temperature 0.2] [--skip-bad]
#          [--shard-id I --num-shards K]     then: bash scripts/eval_vg.sh merge --annotations FILE --out DIR --num-shards K
# Writes OUT/predictions.json, metrics.json, metrics.txt, summary.json; a rerun resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 -m eval.vg "$@"
