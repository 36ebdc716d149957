#!/usr/bin/env bash
# ViP-Bench: answer (region mode by default), grade with an OpenAI-compatible judge (cached), score.
# Usage: bash scripts/eval_vipbench.sh --model DIR --data VIPBENCH_DIR --split bbox|human --out DIR
#          [--adapter DIR] [--mode region|visual] [--judge-base-url URL --judge-model NAME] [--runs N]
#          [--max-new-tokens N] [--batch-size N|auto] [--eager] [--shard-id I --num-shards K]
#        then, for shards: bash scripts/eval_vipbench.sh merge --data DIR --split S --out DIR --num-shards K [judge flags]
# The judge key is read from JUDGE_API_KEY, else OPENAI_API_KEY (keyless local servers need neither).
# Without a judge the answers are written ungraded. Offline fixture: python -m data_converters.synthetic_vipbench --out DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 -m eval.vipbench "$@"
