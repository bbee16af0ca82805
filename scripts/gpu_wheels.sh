#!/usr/bin/env bash
# Fills .whl/ with the wheels the lent GPU machine lacks (it has no package index; its image holds
# torch, triton, transformers, peft, grpcio, protobuf, prometheus-client, matplotlib, ...: see the
# device tool's KINDS.md) so that scripts/gpu_suite.sh can run `loraplex serve`, the gateway and the
# structured-output paths there. Versions are those installed in this machine's environment
# ($PYTHON, after `bash scripts/install.sh`), for CPython 3.12 on x86-64 Linux.
# grpcio and protobuf travel too: the generated stubs need at least the versions they were made with.
# Usage: bash scripts/gpu_wheels.sh   (then name .whl in the device call's carry)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NAMES=(grpcio protobuf grpcio-health-checking grpcio-reflection googleapis-common-protos
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc
  xgrammar apache-tvm-ffi pyzmq fastapi starlette uvicorn pydantic pydantic-core annotated-types
  annotated-doc typing-inspection openai jiter distro sniffio
  typing-extensions httpx2 httpcore2 truststore anyio idna opentelemetry-exporter-otlp-common)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
for name in "${NAMES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  [[ -z $version ]] && { echo "skip $name (not installed here)"; continue; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version" \
    || echo "FAILED: $name==$version" >&2
done
ls .whl | wc -l
du -sh .whl
