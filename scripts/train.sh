#!/usr/bin/env bash
# Validate a recipe, then launch it with DeepSpeed.
# Usage: bash scripts/train.sh configs/<recipe>.yaml [section.key=value ...]
# Environment: NUM_GPUS (default: all visible GPUs; on a CPU-only machine 2 processes over gloo),
#              HOSTFILE (multi-node: a DeepSpeed hostfile, e.g. "node1 slots=8" per line), MASTER_PORT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
RECIPE="${1:?usage: bash scripts/train.sh configs/<recipe>.yaml [section.key=value ...]}"
shift
export TOKENIZERS_PARALLELISM=false
# Fails here, with one line naming the key or file, before any process is spawned or weight is loaded.
python "$ROOT/train_sft.py" --config "$RECIPE" --check "$@"
LAUNCH=(deepspeed --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  LAUNCH+=(--hostfile "$HOSTFILE")
elif [ -n "${NUM_GPUS:-}" ]; then
  LAUNCH+=(--num_gpus "$NUM_GPUS")
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  LAUNCH+=(--num_gpus 2)
fi
exec "${LAUNCH[@]}" "$ROOT/train_sft.py" --config "$RECIPE" "$@"
