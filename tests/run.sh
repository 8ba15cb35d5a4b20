#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests over real sockets.
# The gRPC tests use a real gRPC client and server (Python grpcio); the
# tracing tests a collector that decodes with opentelemetry-proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import grpc' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check grpcio
fi
# The OTLP collector stand-in decodes spans with OpenTelemetry's own protos.
if ! "$PY" -c 'import opentelemetry.proto' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check opentelemetry-proto
fi
export OUTRIGGER_TEST_PYTHON="$PY"
cargo test "$@"
