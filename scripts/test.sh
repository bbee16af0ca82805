#!/usr/bin/env bash
# The test command on a machine without a GPU: install (skipped when up to date), lint,
# type-check the whole package, check the generated gRPC stubs are fresh, then pytest in
# two timed tiers: fast (everything not marked slow) and slow (`-m slow`: multi-minute CPU
# tests). GPU tests skip. Every step runs even when an earlier one failed; the exit status
# is non-zero when any did. LORAPLEX_TEST_TIERS=fast runs only the first tier; extra
# arguments go to pytest in each tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh server,gateway,test
PY=${PYTHON:-python3}
TIERS=${LORAPLEX_TEST_TIERS:-fast,slow}
failed=()

step() {  # step NAME COMMAND...: run it, timed; remember a failure and go on
  local name=$1 start rc=0
  shift
  echo "== $name"
  start=$SECONDS
  "$@" || rc=$?
  echo "== $name: $((SECONDS - start)) s, exit $rc"
  if [[ $rc != 0 ]]; then failed+=("$name"); fi
}

# pytest's exit 5 (no test selected, e.g. `-k` matching nothing in this tier) does not fail a tier.
pytest_tier() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider -m "$@" || rc=$?
  if [[ $rc == 5 ]]; then echo "(no test selected in this tier)"; return 0; fi
  return "$rc"
}

step "ruff" "$PY" -m ruff check .
step "mypy (every package)" bash scripts/typecheck.sh
step "generated stubs" "$PY" -m loraplex.clients.codegen --check
if [[ ,$TIERS, == *,fast,* ]]; then step "pytest fast tier" pytest_tier "not gpu and not slow" "$@"; fi
if [[ ,$TIERS, == *,slow,* ]]; then step "pytest slow tier" pytest_tier "slow and not gpu" "$@"; fi

if (( ${#failed[@]} )); then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "all steps passed"
