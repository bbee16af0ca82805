#!/usr/bin/env bash
# Quick start: install, then serve the built-in demo model and its adapters over gRPC
# (port 50051, Prometheus metrics on 9400). Extra arguments go to `loraplex serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec loraplex serve "$@"
