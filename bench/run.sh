#!/usr/bin/env bash
# Benchmark: bare Envoy doing a native route rewrite + header swap, against
# Envoy with the filter, in one run on this machine. Prints requests/s, CPU
# per request and their ratios. Options go to bench/bench.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
  echo "bench: installing wrk (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q wrk >&2; else sudo apt-get install -y -q wrk >&2; fi
fi
if ! command -v go >/dev/null; then
  echo "bench: installing golang-go (Debian package) for the streaming upstream" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q golang-go >&2; else sudo apt-get install -y -q golang-go >&2; fi
fi
./wasm-build.sh
./native-build.sh >&2
cargo build --release --locked --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml >&2
venv=$(tests/venv.sh)
exec "$venv/bin/python" bench/bench.py "$@"
