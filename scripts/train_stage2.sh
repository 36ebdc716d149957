#!/usr/bin/env bash
# configs/gpt4roi_stage2.yaml through scripts/train.sh; extra arguments are section.key=value overrides.
exec bash "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$(dirname "${BASH_SOURCE[0]}")/../configs/gpt4roi_stage2.yaml" "$@"
