#!/usr/bin/env bash
# The test command on a machine without a GPU: install (skipped when up to date), lint,
# type-check the whole package, check the generated gRPC stubs are fresh, then pytest in
# two timed tiers: fast (everything not marked slow) and slow (`-m slow`: multi-minute CPU
# tests). GPU tests skip. LORAPLEX_TEST_TIERS=fast runs only the first tier; extra
# arguments go to pytest in each tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh server,gateway,test
PY=${PYTHON:-python3}
TIERS=${LORAPLEX_TEST_TIERS:-fast,slow}

echo "== ruff"; "$PY" -m ruff check .
echo "== mypy (every package)"; bash scripts/typecheck.sh
echo "== generated stubs"; "$PY" -m loraplex.clients.codegen --check

# One pytest tier, timed; pytest's exit 5 (no test selected, e.g. `-k` matching nothing
# in this tier) is not a failure of the tier.
run_tier() {
  local name=$1 marker=$2 start rc=0
  shift 2
  echo "== pytest: $name tier (-m \"$marker\")"
  start=$SECONDS
  "$PY" -m pytest -q -m "$marker" -p no:cacheprovider "$@" || rc=$?
  echo "== pytest: $name tier took $((SECONDS - start)) s (exit $rc)"
  if [[ $rc == 5 ]]; then echo "   (no test selected in this tier)"; rc=0; fi
  return "$rc"
}

failed=0
if [[ ,$TIERS, == *,fast,* ]]; then run_tier fast "not gpu and not slow" "$@" || failed=1; fi
if [[ ,$TIERS, == *,slow,* ]]; then run_tier slow "slow and not gpu" "$@" || failed=1; fi
exit "$failed"
