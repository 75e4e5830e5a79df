#!/usr/bin/env bash
# GPU check: TAPT, fine-tuning and pool scoring of the base-shaped wav2vec2 and HuBERT models on
# the first CUDA device, in bf16 (precision auto), with utterances/s, real-time factor and peak
# CUDA memory per stage. Exit 0 = every GPU path ran; 1 = a stage failed (the message names it);
# 3 = no CUDA device. Designed to end in under 5 minutes (not yet timed on a GPU); --quick runs
# wav2vec2 only, 1 timed step per stage. The timeout below stops it at 5 minutes (exit 124).
#
#   scripts/gpu_check.sh            # both backbones, 3 timed steps per stage
#   scripts/gpu_check.sh --quick    # extra arguments go to `after-ray bench gpu`
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
exec timeout 300 "$PYTHON" -m after_ray bench gpu "$@"
