#!/usr/bin/env bash
# Builds the release filter module for wasm32-wasip1, drops the proxy-wasm
# callbacks it does not implement, shrinks it with binaryen's wasm-opt, and
# prints its path, size and sha256. Adds the Rust target, and fetches
# wasm-opt from npm, when they are missing.
set -euo pipefail
cd "$(dirname "$0")"

target=wasm32-wasip1
binaryen_version=132.0.0
out="$PWD/target/azure_openai_filter.wasm"

# The proxy-wasm callbacks the filter implements. The SDK exports every
# callback; Envoy enters the VM for each one exported (about a microsecond a
# time) and skips the rest, so the module exports only these.
callbacks=(
  proxy_on_memory_allocate proxy_on_vm_start proxy_on_configure
  proxy_on_context_create proxy_on_delete
  proxy_on_request_headers proxy_on_request_body proxy_on_request_trailers
  proxy_on_response_headers proxy_on_response_body
  proxy_on_tick proxy_on_http_call_response
)

if ! rustup target list --installed | grep -qx "$target"; then
  echo "wasm-build: adding Rust target $target" >&2
  rustup target add "$target" >&2
fi

# --lib: the command-line tool (src/bin) is native only.
cargo build --release --locked --lib --target "$target" >&2
raw="$PWD/target/$target/release/azure_openai_filter.wasm"

# wasm-opt: from PATH, else binaryen from the npm registry into target/tools.
wasm_opt=$(command -v wasm-opt || true)
if [ -z "$wasm_opt" ]; then
  tools="$PWD/target/tools"
  wasm_opt="$tools/node_modules/binaryen/bin/wasm-opt"
  if [ ! -x "$wasm_opt" ]; then
    echo "wasm-build: installing binaryen $binaryen_version (wasm-opt) from npm" >&2
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" "binaryen@$binaryen_version" >&2
  fi
fi

# Rewrite the export section without the other proxy_on_* callbacks; the
# wasm-opt pass below then removes the code only they reached.
trimmed="$PWD/target/$target/release/azure_openai_filter.trimmed.wasm"
python3 - "$raw" "$trimmed" "${callbacks[@]}" <<'PY'
import sys

source, dest, keep = sys.argv[1], sys.argv[2], set(sys.argv[3:])

def read_leb(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i

def leb(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)

data = open(source, "rb").read()
assert data[:8] == b"\0asm\x01\0\0\0", "not a wasm module"
out, i, dropped = bytearray(data[:8]), 8, []
while i < len(data):
    section = data[i]
    size, start = read_leb(data, i + 1)
    end = start + size
    if section != 7:  # not the export section: copied as is
        out += data[i:end]
        i = end
        continue
    count, j = read_leb(data, start)
    kept, kept_names = [], set()
    for _ in range(count):
        length, j = read_leb(data, j)
        name = data[j:j + length].decode()
        j += length
        kind = data[j]
        index, j = read_leb(data, j + 1)
        if name.startswith("proxy_on_") and name not in keep:
            dropped.append(name)
        else:
            kept.append(leb(len(name)) + name.encode() + bytes([kind]) + leb(index))
            kept_names.add(name)
    missing = keep - kept_names
    assert not missing, f"callbacks not exported by the build: {sorted(missing)}"
    body = leb(len(kept)) + b"".join(kept)
    out += bytes([7]) + leb(len(body)) + body
    i = end
open(dest, "wb").write(out)
print(f"wasm-build: dropped {len(dropped)} unused callback exports", file=sys.stderr)
PY

# The features rustc already uses for this target; wasm-opt adds none.
"$wasm_opt" -Oz --strip-debug --strip-producers \
  --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
  --enable-nontrapping-float-to-int --enable-reference-types --enable-multivalue \
  "$trimmed" -o "$out"

echo "path:   $out"
echo "size:   $(stat -c %s "$out") bytes"
echo "sha256: $(sha256sum "$out" | cut -d' ' -f1)"
