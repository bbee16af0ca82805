#!/usr/bin/env bash
# Quick start: install the server extra (plus triton where there is a GPU; nothing when it is
# already installed), then serve the built-in demo model and its adapters over gRPC
# (port 50051, Prometheus metrics on 9400). Extra arguments go to `loraplex serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=server
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras=server,gpu
fi
bash scripts/install.sh "$extras"
exec "$PY" -m loraplex serve "$@"
