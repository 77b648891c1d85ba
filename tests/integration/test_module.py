"""The built module itself, and what it writes to Envoy's log."""

import json

import httpx
from conftest import EAST_KEY, OPS_KEY, TEAM_A_KEY, WEST_KEY
from harness import WASM

SIZE_BUDGET = 350 * 1000


def test_release_module_stays_under_350_kb():
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
    log = gateway.log()
    assert "caller `team-a` model `gpt-4o` -> upstream `west`" in log  # decisions are logged
    for secret in (TEAM_A_KEY, OPS_KEY, "sk-wrong-key-123", WEST_KEY, EAST_KEY):
        assert secret not in log
