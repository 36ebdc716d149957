#!/usr/bin/env bash
# The main job end to end on the embedded default, on CPU (2 processes) in a few minutes:
# synthetic Pix2Cap-format data -> conversion -> tiny random base model -> DeepSpeed fine-tuning
# (configs/quickstart.yaml) -> export -> VG-protocol region captioning of the base and the trained model
# on held-out images -> runs/quickstart/report.{json,md}, loss.png, example_captions.png.
# Rerunning reuses what is already there (training resumes from its last checkpoint, or says it is complete);
# a model that changed (more steps in the recipe) is exported and evaluated again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }

stage "setting up the environment (.venv)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS="ignore::FutureWarning" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
# QUICKSTART_SEED=1 bash scripts/quickstart.sh: another draw of data, random model and training order, in runs/quickstart_seed1.
# QUICKSTART_RUN=DIR puts the whole run (data, models, evaluations, report) in DIR instead.
SEED="${QUICKSTART_SEED:-0}"
RUN=runs/quickstart
[ "$SEED" = 0 ] || RUN="runs/quickstart_seed$SEED"
RUN="${QUICKSTART_RUN:-$RUN}"
PATHS=(model.path="$RUN/tiny_model" data.train="$RUN/train.jsonl" data.image_root="$RUN/data"
       train.output_dir="$RUN/train" train.seed="$SEED")
mkdir -p "$RUN"

stage "generating synthetic Pix2Cap-COCO data ($RUN/data)"
if [ ! -f "$RUN/data/annotations/test_caption.json" ]; then
  python -m data_converters.synthetic --out "$RUN/data" --train-images 2000 --val-images 100 --seed "$SEED"
else
  echo "already there"
fi

stage "converting pix2cap_coco_train.json to conversations ($RUN/train.jsonl)"
python -m data_converters.pix2cap --annotations "$RUN/data/annotations/pix2cap_coco_train.json" \
  --out "$RUN/train.jsonl" --stats "$RUN/train_stats.json"

stage "building the tiny random base model ($RUN/tiny_model)"
if [ ! -f "$RUN/tiny_model/config.json" ]; then
  python -m quickstart.tiny_model --out "$RUN/tiny_model" --seed "$SEED"
else
  echo "already there"
fi

stage "fine-tuning: deepspeed --num_gpus 2 train_sft.py --config configs/quickstart.yaml (2 CPU processes)"
python train_sft.py --config configs/quickstart.yaml --check "${PATHS[@]}"
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29520}" \
  train_sft.py --config configs/quickstart.yaml "${PATHS[@]}"

stage "exporting the trained model ($RUN/trained_model)"
python -m gpt4roi_sft.export --checkpoint "$RUN/train" --out "$RUN/trained_model" --overwrite

# --overwrite: predictions of another model (a retrained one) are replaced; those of this same model are reused.
VG=(--annotations "$RUN/data/annotations/test_caption.json" --image-root "$RUN/data" --batch-size 32 --max-new-tokens 48 --overwrite)
stage "evaluating the untrained base model on held-out images"
python -m eval.vg --model "$RUN/tiny_model" --out "$RUN/eval_before" "${VG[@]}"
stage "evaluating the trained model on the same images"
python -m eval.vg --model "$RUN/trained_model" --out "$RUN/eval_after" "${VG[@]}"

stage "segmentation captioning: the trained model on the ground-truth segments of the held-out images"
python -m eval.segcap_predict --data "$RUN/data" --split val --model "$RUN/trained_model" --out "$RUN/segcap_after" \
  --batch-size 32 --max-new-tokens 48 --overwrite

stage "report"
python -m quickstart.report --before "$RUN/eval_before" --after "$RUN/eval_after" --train-dir "$RUN/train" \
  --annotations "$RUN/data/annotations/test_caption.json" --image-root "$RUN/data" --segcap "$RUN/segcap_after" \
  --out "$RUN"
echo
echo "Done in $(( $(date +%s) - START ))s. Read $RUN/report.md; pictures: $RUN/loss.png, $RUN/example_captions.png"
