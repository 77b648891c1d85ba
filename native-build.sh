#!/usr/bin/env bash
# Builds the filter as a native Envoy dynamic module (a shared library for
# Envoy 1.40.x, dynamic-module ABI v0.2.0), with unwinding so that every
# hook catches panics (profile `native`: release with panic = "unwind"),
# and prints its path, size and sha256. Envoy loads it as
# libazure_openai_filter.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
set -euo pipefail
cd "$(dirname "$0")"

out_dir="$PWD/target/native"
out="$out_dir/libazure_openai_filter.so"

# --lib: the command-line tool (src/bin) is not part of the module.
cargo build --locked --lib --profile native --features native >&2
mkdir -p "$out_dir"
cp "$PWD/target/native/libazure_openai_filter.so" "$out.tmp" 2>/dev/null ||
  cp "$PWD/target/native/deps/libazure_openai_filter.so" "$out.tmp"
mv "$out.tmp" "$out"

echo "path:   $out"
echo "size:   $(stat -c %s "$out") bytes"
echo "sha256: $(sha256sum "$out" | cut -d' ' -f1)"
