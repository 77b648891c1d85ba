"""The built module itself, and what it writes to Envoy's log."""

import json

import httpx
from conftest import EAST_KEY, OPS_KEY, TEAM_A_KEY, WEST_KEY
from harness import WASM, wasm_only

# 350 KB while the filter only routed; raised for usage accounting and
# metrics, compressed-error decoding, deployment pools and caller limits.
# Size costs load time and memory per VM, not time per request.
SIZE_BUDGET = 450 * 1000


@wasm_only("the .wasm's size")
def test_release_module_stays_under_450_kb():
    size = WASM.stat().st_size
    assert size < SIZE_BUDGET, f"{WASM.name} is {size} bytes"


def test_no_key_reaches_the_log(gateway, west):
    """Envoy's wasm component at trace level: the filter logs every decision
    but never a caller key or an upstream key."""
    chat = json.dumps({"model": "gpt-4o", "messages": []})
    for key in (TEAM_A_KEY, OPS_KEY, "sk-wrong-key-123"):
        httpx.post(gateway.url + "/v1/chat/completions", content=chat,
                   headers={"authorization": f"Bearer {key}"}, timeout=30)
    httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps({"model": "gpt-4o-mini"}),
               headers={"api-key": TEAM_A_KEY}, timeout=30)
    assert gateway.wait_for_log("caller `team-a` model `gpt-4o` -> upstream `west`")  # decisions are logged
    log = gateway.log()
    for secret in (TEAM_A_KEY, OPS_KEY, "sk-wrong-key-123", WEST_KEY, EAST_KEY):
        assert secret not in log


def wasm_exports(path):
    """Export names of a wasm module (export section, id 7)."""
    data = path.read_bytes()

    def leb(i):
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, i

    i, names = 8, []
    while i < len(data):
        section = data[i]
        size, start = leb(i + 1)
        if section == 7:
            count, j = leb(start)
            for _ in range(count):
                length, j = leb(j)
                names.append(data[j:j + length].decode())
                _, j = leb(j + length + 1)
        i = start + size
    return names


@wasm_only("the .wasm's export list (test_native.py checks the .so's)")
def test_module_exports_only_the_callbacks_it_implements():
    """Envoy enters the VM for every exported callback; the build keeps only
    these (wasm-build.sh)."""
    callbacks = {name for name in wasm_exports(WASM) if name.startswith("proxy_on_")}
    assert callbacks == {
        "proxy_on_memory_allocate", "proxy_on_vm_start", "proxy_on_configure",
        "proxy_on_context_create", "proxy_on_delete",
        "proxy_on_request_headers", "proxy_on_request_body", "proxy_on_request_trailers",
        "proxy_on_response_headers", "proxy_on_response_body",
        "proxy_on_tick", "proxy_on_http_call_response",
    }
