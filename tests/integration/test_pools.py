"""Deployment pools through a real Envoy (2 workers): priority and weights,
failover on 429, 5xx and refused connections (streams too), cooldowns every
worker honours, the 429 when every target cools, and PTU spillover."""

import json
import socket
import time

import httpx
import openai
import pytest
from harness import (Envoy, RecordingUpstream, Reply, assert_openai_error, bootstrap, cluster,
                     sha256_hex, wasm_filter)

KEY = "sk-pools-caller-0001"


def chat_reply(name):
    def reply(request):
        body = json.loads(request.body or b"{}")
        if body.get("stream"):
            chunks = [f'data: {{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{name}"}}}}]}}\n\n'.encode(),
                      b"data: [DONE]\n\n"]
            return Reply(200, {"content-type": "text/event-stream"}, chunks)
        return Reply(200, {"content-type": "application/json", "x-served-by": name}, json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"from {name}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode())
    return reply


def throttled(ms=None):
    headers = {"content-type": "application/json", "retry-after": "1"}
    if ms is not None:
        headers["retry-after-ms"] = str(ms)
    body = json.dumps({"error": {"code": "429", "message": "Requests to the deployment have "
                                 "exceeded the rate limit."}}).encode()
    return lambda request: Reply(429, headers, body)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def upstreams():
    servers = {name: RecordingUpstream(name) for name in ("ptu", "west", "east")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh(upstreams):
    for name, server in upstreams.items():
        server.reset()
        server.responder = chat_reply(name)
    yield


DEAD_PORT = free_port()


def config(upstreams):
    def azure(name, port, key):
        return {"endpoint": f"http://127.0.0.1:{port}", "cluster": name,
                "auth": {"api_key": {"value": key}}}
    return {
        "upstreams": {
            "ptu": azure("ptu", upstreams["ptu"].port, "ptu-key"),
            "west": azure("west", upstreams["west"].port, "west-key"),
            "east": azure("east", upstreams["east"].port, "east-key"),
            "dead": azure("dead", DEAD_PORT, "dead-key"),
        },
        "models": {
            "gpt-4o": {"targets": [
                {"upstream": "ptu", "deployment": "gpt4o-ptu", "priority": 0,
                 "spillover_deployment": "gpt4o-standard"},
                {"upstream": "west", "deployment": "gpt4o", "priority": 1, "weight": 3},
                {"upstream": "east", "deployment": "gpt4o", "priority": 1, "weight": 1},
            ]},
            "flaky": {"targets": [
                {"upstream": "dead", "deployment": "gone", "priority": 0},
                {"upstream": "east", "deployment": "flaky-east", "priority": 1},
            ]},
            "solo": {"upstream": "west", "deployment": "solo"},
        },
        "callers": [{"name": "team", "key_sha256": sha256_hex(KEY), "models": ["*"]}],
    }


@pytest.fixture(scope="module")
def gateway(upstreams):
    clusters = [cluster(name, server.port) for name, server in upstreams.items()]
    clusters.append(cluster("dead", DEAD_PORT))
    envoy = Envoy(bootstrap([wasm_filter(config(upstreams))], clusters))
    envoy.start()
    yield envoy
    envoy.cleanup()


def chat(gateway, model="gpt-4o", **extra):
    return httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEY}", "x-ms-spillover-deployment": "evil",
                               "x-ms-region-steer": "1"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                            **extra})


def wait_cooldown_over(seconds):
    time.sleep(seconds + 0.4)


def test_the_first_priority_gets_the_traffic_with_its_spillover(gateway, upstreams):
    for _ in range(6):
        response = chat(gateway)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "from ptu"
    assert len(upstreams["ptu"].received) == 6
    assert upstreams["west"].received == [] and upstreams["east"].received == []
    sent = upstreams["ptu"].received[0]
    assert sent.path.startswith("/openai/deployments/gpt4o-ptu/chat/completions")
    # The operator's spillover, never the caller's, and no caller x-ms-* header.
    assert sent.all("x-ms-spillover-deployment") == ["gpt4o-standard"]
    assert sent.all("x-ms-region-steer") == []


def test_a_429_fails_over_and_every_worker_skips_the_target_until_its_time(gateway, upstreams):
    throttled_at = time.monotonic()
    upstreams["ptu"].responder = throttled(ms=5000)
    first = chat(gateway)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] in ("from west", "from east")
    assert len(upstreams["ptu"].received) == 1
    retried = upstreams["west"].received + upstreams["east"].received
    assert len(retried) == 1
    # The failover attempt carries its own target's credential and deployment.
    attempt = retried[0]
    assert attempt.path.startswith("/openai/deployments/gpt4o/chat/completions?api-version=")
    assert attempt.all("api-key") in (["west-key"], ["east-key"])
    assert attempt.all("authorization") == []
    assert attempt.all("x-ms-spillover-deployment") == []
    assert json.loads(attempt.body)["messages"] == [{"role": "user", "content": "hi"}]
    # Cooling down: no request from either worker reaches the PTU target
    # (those sent well within its 5 s; the loop is bounded in count and time).
    time.sleep(0.4)  # the other worker reads the cooldown on its tick
    sent = 0
    while sent < 40 and time.monotonic() < throttled_at + 4:
        assert chat(gateway).status_code == 200
        sent += 1
    assert sent >= 20
    assert len(upstreams["ptu"].received) == 1
    # All of it went to the next priority (shared 3:1 by weight at random;
    # the native tests check the shares).
    served = len(upstreams["west"].received), len(upstreams["east"].received)
    assert sum(served) == sent + 1, served
    # When its time is up it gets traffic again.
    upstreams["ptu"].responder = chat_reply("ptu")
    time.sleep(max(0.0, throttled_at + 5.4 - time.monotonic()))
    assert chat(gateway).json()["choices"][0]["message"]["content"] == "from ptu"


def test_a_streaming_request_fails_over_before_any_byte_reaches_the_caller(gateway, upstreams):
    upstreams["ptu"].responder = throttled(ms=1500)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-4o", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text in ("west", "east")
    sent = (upstreams["west"].received + upstreams["east"].received)[0]
    assert json.loads(sent.body)["stream_options"] == {"include_usage": True}
    upstreams["ptu"].responder = chat_reply("ptu")
    wait_cooldown_over(1.5)


def test_a_5xx_and_a_refused_connection_fail_over(gateway, upstreams):
    upstreams["ptu"].responder = lambda r: Reply(503, {"content-type": "text/plain"}, b"busy")
    response = chat(gateway)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] in ("from west", "from east")
    upstreams["ptu"].responder = chat_reply("ptu")
    # Nothing listens on the first target of `flaky`.
    response = chat(gateway, model="flaky")
    assert response.status_code == 200, response.text
    assert upstreams["east"].received[-1].path.startswith("/openai/deployments/flaky-east/")
    wait_cooldown_over(1.0)


def test_every_target_cooling_gives_a_429_with_retry_after_and_nothing_forwarded(gateway, upstreams):
    for name in upstreams:
        upstreams[name].responder = throttled(ms=3000 if name == "ptu" else 2000)
    response = chat(gateway)
    error = assert_openai_error(response, 429, "rate_limit_exceeded")
    assert "gpt-4o" in error["message"]
    assert response.headers["retry-after"] == "2"
    assert 1500 <= int(response.headers["retry-after-ms"]) <= 2000
    attempts = sum(len(server.received) for server in upstreams.values())
    assert attempts == 3
    for server in upstreams.values():
        server.reset()
    time.sleep(0.4)
    again = chat(gateway)
    assert_openai_error(again, 429, "rate_limit_exceeded")
    assert sum(len(server.received) for server in upstreams.values()) == 0
    for name, server in upstreams.items():
        server.responder = chat_reply(name)
    wait_cooldown_over(3.0)
    assert chat(gateway).status_code == 200


def test_a_single_target_model_passes_azures_429_unchanged(gateway, upstreams):
    upstreams["west"].responder = throttled(ms=1000)
    response = chat(gateway, model="solo")
    assert response.status_code == 429
    assert response.headers["retry-after-ms"] == "1000"
    assert json.loads(response.content)["error"]["code"] == "429"
    assert len(upstreams["west"].received) == 1


def test_pool_stats_show_requests_throttles_failovers_and_cooling(gateway, upstreams):
    upstreams["ptu"].responder = throttled(ms=2000)
    chat(gateway)
    time.sleep(1.2)
    text = httpx.get(gateway.admin + "/stats/prometheus", timeout=5).text
    lines = [line for line in text.splitlines() if line.startswith("azure_openai_target")]
    ptu = 'upstream="ptu",deployment="gpt4o-ptu"'
    assert any(line.startswith(f"azure_openai_target_throttled_total{{{ptu}}}") for line in lines), lines
    assert any(line.startswith(f"azure_openai_target_failovers_total{{{ptu}}}") for line in lines), lines
    assert f"azure_openai_target_cooling{{{ptu}}} 1" in lines, lines
    upstreams["ptu"].responder = chat_reply("ptu")
    wait_cooldown_over(2.0)
