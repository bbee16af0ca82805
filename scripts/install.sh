#!/usr/bin/env bash
# Installs loraplex (editable) with the extras given as $1 (default: server,gateway,test)
# into the current Python ($PYTHON, else python3).
# torch goes first: a CPU build where there is no GPU (a plain `torch` requirement would
# pull several GB of CUDA packages), the default build where there is one.
# Nothing is installed when a stamp in the environment says these extras were installed
# from this checkout's pyproject.toml and setup.py as they are now.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-server,gateway,test}
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
STAMP_FILE="$PREFIX/.loraplex-install-stamp"
SOURCE_HASH="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1) $PWD"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# The stamp is "<hash> <checkout>\n<extra>,<extra>,...": up to date when the hash and
# checkout match and every extra asked for was installed.
up_to_date() {
  [[ -f $STAMP_FILE ]] || return 1
  [[ $(head -n1 "$STAMP_FILE") == "$SOURCE_HASH" ]] || return 1
  local have extra
  have=",$(sed -n 2p "$STAMP_FILE"),"
  for extra in ${EXTRAS//,/ }; do [[ $have == *",$extra,"* ]] || return 1; done
  "$PY" -c "import loraplex" 2>/dev/null
}

if up_to_date; then
  exit 0
fi
echo "== installing loraplex[$EXTRAS] into $PREFIX (first run, or pyproject.toml/setup.py changed)"
if "$PY" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
  echo "   (not a virtualenv: consider \`python3 -m venv .venv && source .venv/bin/activate\` first)"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  if has_gpu; then
    "$PY" -m pip install torch
  else
    "$PY" -m pip install "torch==${LORAPLEX_CPU_TORCH:-2.13.0}"
  fi
fi
"$PY" -m pip install -e ".[$EXTRAS]"
installed=$EXTRAS
if [[ -f $STAMP_FILE && $(head -n1 "$STAMP_FILE") == "$SOURCE_HASH" ]]; then
  installed="$(sed -n 2p "$STAMP_FILE"),$EXTRAS"
fi
{ echo "$SOURCE_HASH"; echo "$installed"; } > "$STAMP_FILE" 2>/dev/null || true
