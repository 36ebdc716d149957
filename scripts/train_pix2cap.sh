#!/usr/bin/env bash
# configs/pix2cap_sft.yaml through scripts/train.sh; extra arguments are section.key=value overrides.
exec bash "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$(dirname "${BASH_SOURCE[0]}")/../configs/pix2cap_sft.yaml" "$@"
