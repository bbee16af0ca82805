#!/usr/bin/env bash
# Installs loraplex with the server, gateway and test extras into the current Python.
# torch goes first: a CPU build where there is no GPU (a plain `torch` requirement
# would pull several GB of CUDA packages), the default build where there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==${LORAPLEX_CPU_TORCH:-2.13.0}"
  fi
fi
"$PY" -m pip install -q -e ".[server,gateway,test]"
