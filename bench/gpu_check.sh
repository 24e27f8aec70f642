#!/usr/bin/env bash
# The short GPU check, for a session that has a device machine: CUDA tests, then the decode
# benchmark's two figures (tokens/s vs transformers, verification cost curve) on the GPU.
# Writes bench/results/decode-cuda-*.{json,png} (copy them to $OUT on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m pytest -q tests/gpu
"$PY" bench/decode.py --device cuda --dtype bf16 --prompts 20 --new-tokens 128 --repeats 10
"$PY" bench/decode.py --device cuda --dtype fp32 --prompts 20 --new-tokens 128 --repeats 10
if [ -n "${OUT:-}" ]; then cp bench/results/decode-cuda-* "$OUT"/; fi
