#!/usr/bin/env bash
# Pix2Cap's panoptic segmentation-captioning benchmark: caption segments with our model, then score.
# Usage: bash scripts/eval_segcap.sh --model DIR --data DIR --out DIR [--adapter DIR] [--segmenter DIR]
#          [--segments-json FILE --segments-dir DIR] [--split val] [--batch-size N] [--max-new-tokens N]
#          [--max-images N] [--spice-jars DIR] [--map-meteor auto|nltk|pycocoevalcap] [--nltk-data DIR] [--no-eval]
#   without --segmenter: captions the ground-truth (or --segments-json) segments; PQ is then 100
#   with --segmenter DIR: Mask2FormerForUniversalSegmentation segments first (two-stage)
# --data holds annotations/pix2cap_coco_<split>.json, panoptic_<split>2017/ and <split>2017/.
# Writes OUT/predictions.json, OUT/panoptic_pred/, metrics.json, metrics.txt; a rerun resumes.
# Scoring an existing prediction: python -m eval.segcap --gt-json ... --gt-dir ... --pred-json ... --pred-dir ... --out DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m eval.segcap_predict "$@"
