#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests over real sockets.
# The gRPC tests use a real gRPC client and server (Python grpcio).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import grpc' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check grpcio
fi
export OUTRIGGER_TEST_PYTHON="$PY"
cargo test "$@"
