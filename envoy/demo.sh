#!/usr/bin/env bash
# Starts the demo gateway: builds the filter, installs Envoy (PyPI, into
# .venv), starts the Azure stand-in, then Envoy with envoy/demo.yaml, and
# says it is ready once both answer. Ctrl-C stops both.
#
# Ports (environment variables; 0 picks a free port):
#   GATEWAY_PORT  the gateway, OpenAI API     (default 10000)
#   STANDIN_PORT  the Azure stand-in          (default 10001)
#   ADMIN_PORT    Envoy's admin interface     (default 9901)
# AZURE_DEMO_KEY is the upstream key the gateway sends and the stand-in
# accepts (default demo-upstream-key).
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY_PORT="${GATEWAY_PORT:-10000}"
STANDIN_PORT="${STANDIN_PORT:-10001}"
ADMIN_PORT="${ADMIN_PORT:-9901}"
for port in "$GATEWAY_PORT" "$STANDIN_PORT" "$ADMIN_PORT"; do
  case "$port" in
    ''|*[!0-9]*) echo "demo: ports must be numbers (GATEWAY_PORT, STANDIN_PORT, ADMIN_PORT)" >&2; exit 2 ;;
  esac
done
export AZURE_DEMO_KEY="${AZURE_DEMO_KEY:-demo-upstream-key}"

./wasm-build.sh >/dev/null
venv=$(tests/venv.sh)
python="$venv/bin/python"

run=$(mktemp -d "${TMPDIR:-/tmp}/azure-openai-demo.XXXXXX")
standin=""
envoy=""
cleanup() {
  trap - EXIT INT TERM
  for pid in $envoy $standin; do kill "$pid" 2>/dev/null || true; done
  for pid in $envoy $standin; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The deployments the demo configuration maps its models to.
deployments=(gpt4o-demo gpt4o-mini-demo embed-demo dalle-demo image-demo whisper-demo
             tts-demo gpt41-demo)
"$python" envoy/azure_standin.py --port "$STANDIN_PORT" --key "$AZURE_DEMO_KEY" \
  "${deployments[@]/#/--deployment=}" >"$run/standin.out" 2>"$run/standin.err" &
standin=$!

# The stand-in prints its address once it listens; if it cannot bind, it
# exits, and so does the demo.
for _ in $(seq 100); do
  if grep -q "listening on" "$run/standin.out" 2>/dev/null; then break; fi
  if ! kill -0 "$standin" 2>/dev/null; then
    echo "demo: the Azure stand-in did not start:" >&2
    cat "$run/standin.err" >&2
    echo "demo: choose another port with STANDIN_PORT=..." >&2
    exit 1
  fi
  sleep 0.1
done
standin_port=$(sed -n 's/.*listening on .*:\([0-9]*\)$/\1/p' "$run/standin.out" | head -1)
if [ -z "$standin_port" ]; then
  echo "demo: the Azure stand-in did not report its port" >&2
  exit 1
fi

# envoy/demo.yaml with the chosen ports (the file itself is left as it is).
"$python" - envoy/demo.yaml "$run/demo.json" "$GATEWAY_PORT" "$standin_port" "$ADMIN_PORT" <<'PY'
import json, sys
import yaml

source, dest, gateway, standin, admin = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
config = yaml.safe_load(open(source))
text = json.dumps(config)
# The stand-in's address, in the clusters and in the filter's endpoints.
text = text.replace('"port_value": 10001', f'"port_value": {standin}')
text = text.replace("127.0.0.1:10001", f"127.0.0.1:{standin}")
config = json.loads(text)
config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = gateway
config["admin"]["address"]["socket_address"]["port_value"] = admin
json.dump(config, open(dest, "w"))
PY

"$venv/bin/envoy" -c "$run/demo.json" --concurrency 2 --disable-hot-restart \
  --admin-address-path "$run/admin" --log-level warn --component-log-level wasm:info \
  2> >(tee "$run/envoy.log" >&2) &
envoy=$!

# Ready means: Envoy's admin says LIVE and its listener has a port (and,
# below, the stand-in answers an Azure request).
url=$("$python" - "$run/admin" "$envoy" <<'PY'
import os, sys, time, urllib.request, json
admin_path, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("envoy exited")
    try:
        admin = "http://" + open(admin_path).read().strip()
        if urllib.request.urlopen(admin + "/ready", timeout=1).read().strip() == b"LIVE":
            listeners = json.load(urllib.request.urlopen(admin + "/listeners?format=json", timeout=2))
            port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            print(f"http://127.0.0.1:{port} {admin}")
            sys.exit(0)
    except (OSError, ValueError):
        pass
    time.sleep(0.1)
sys.exit("envoy did not become ready within 60 s")
PY
) || {
  echo "demo: Envoy did not start (see its log above); choose other ports with GATEWAY_PORT=... ADMIN_PORT=..." >&2
  exit 1
}
gateway_url=${url% *}
admin_url=${url#* }

# One request to the stand-in through its own front door, as Envoy will send.
if ! "$python" - "$standin_port" "$AZURE_DEMO_KEY" <<'PY'
import sys, urllib.request
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/openai/deployments/gpt4o-demo/chat/completions?api-version=2024-10-21",
                                 data=b'{"messages":[]}', headers={"api-key": sys.argv[2], "content-type": "application/json"})
urllib.request.urlopen(request, timeout=5).read()
PY
then
  echo "demo: the Azure stand-in does not answer" >&2
  exit 1
fi

cat <<MSG

Demo gateway ready on $gateway_url (Azure stand-in on 127.0.0.1:$standin_port, Envoy admin $admin_url).
Ctrl-C stops it. Try:

  curl -s $gateway_url/v1/chat/completions \\
    -H 'Authorization: Bearer sk-demo-team-a' -H 'Content-Type: application/json' \\
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}'

MSG
wait "$envoy"
