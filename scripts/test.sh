#!/usr/bin/env bash
# The whole test suite on a machine without a GPU: install, lint, type-check the
# engine core, check the generated gRPC stubs are fresh, run pytest (GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
echo "== ruff"; "$PY" -m ruff check .
echo "== mypy (engine core)"; "$PY" -m mypy backend/engine loraplex_pkg/config.py backend/sampling_params.py \
  backend/outputs.py loraplex_pkg/errors.py backend/llm.py
echo "== generated stubs"; "$PY" -m loraplex.clients.codegen --check
echo "== pytest"; "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider "$@"
