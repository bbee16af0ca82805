#!/usr/bin/env bash
# Serving benchmarks (bench/serve_suite.py) from this tree without installing it: `import loraplex`
# resolves to this checkout. Results go to $OUT (default bench/results).
#   bash bench/serve_suite.sh [--suite sglang|qwen|all] [--rates 2,4,8,...]   # on a CUDA machine
#   bash bench/serve_suite.sh --smoke                                         # tiny models on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
pkg=$(mktemp -d); trap 'rm -rf "$pkg"' EXIT; mkdir -p "$pkg/loraplex"
for f in loraplex_pkg/*; do ln -s "$PWD/$f" "$pkg/loraplex/$(basename "$f")"; done
for d in backend lora kernels gateway clients; do ln -s "$PWD/$d" "$pkg/loraplex/$d"; done
export PYTHONPATH="$pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
"${PYTHON:-python3}" bench/serve_suite.py "$@"
