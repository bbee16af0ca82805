#!/usr/bin/env bash
# mypy over the whole `loraplex` package. The import package is assembled from the top-level
# folders (see setup.py), so mypy reads it through a tree of symlinks shaped like it: the
# editable install's import hook is invisible to mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tree=build/mypy-src
rm -rf "$tree" && mkdir -p "$tree/loraplex"
for f in loraplex_pkg/*.py loraplex_pkg/py.typed; do
  [[ -e $f ]] && ln -s "$PWD/$f" "$tree/loraplex/"
done
for d in backend lora kernels gateway clients; do ln -s "$PWD/$d" "$tree/loraplex/$d"; done
# PYTHONPATH unset: mypy must read the package from this tree only, not from a second copy on the path
MYPYPATH=$tree exec env -u PYTHONPATH "$PY" -m mypy -p loraplex "$@"
