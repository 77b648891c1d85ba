"""Caller limits inside one Envoy: requests and tokens per minute, shared by
its two workers, through a real Envoy with a recording upstream that answers
like Azure (usage in JSON and in streams)."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from harness import (Envoy, RecordingUpstream, bootstrap, cluster, sha256_hex,
                     wasm_filter)
from test_usage import azure_like, scrape, usage_of, wait_for

KEYS = {name: f"sk-limits-{name}-0001" for name in
        ("burst", "counted", "budget", "free", "tokens-only", "sdk")}
LIMITS = {
    "burst": {"requests_per_minute": 10},
    "counted": {"requests_per_minute": 5},
    "budget": {"tokens_per_minute": 0},  # set in the test from the usage it expects
    "tokens-only": {"tokens_per_minute": 1_000_000},
    "sdk": {"requests_per_minute": 1},
}
MESSAGES = [{"role": "user", "content": "budget me"}]
STREAMED = [{"role": "user", "content": "and stream me too"}]


def spend(messages):
    usage = usage_of({"messages": messages})
    return usage["prompt_tokens"] + usage["completion_tokens"]


# The first answer leaves the budget short; the streamed second spends it.
LIMITS["budget"]["tokens_per_minute"] = spend(MESSAGES) + 1


@pytest.fixture(scope="module")
def upstream():
    server = RecordingUpstream("azure")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh(upstream):
    upstream.reset()
    upstream.responder = azure_like
    yield


@pytest.fixture(scope="module")
def gateway(upstream):
    config = {
        "upstreams": {"azure": {"endpoint": f"http://127.0.0.1:{upstream.port}",
                                "cluster": "azure", "api_version": "2024-10-21",
                                "auth": {"api_key": {"value": "upstream-key"}}}},
        "models": {"gpt-4o": {"upstream": "azure", "deployment": "gpt4o-prod"}},
        "callers": [{"name": name, "key_sha256": sha256_hex(key), "models": ["*"],
                     **({"limits": LIMITS[name]} if name in LIMITS else {})}
                    for name, key in KEYS.items()],
    }
    envoy = Envoy(bootstrap([wasm_filter(config)], [cluster("azure", upstream.port)]),
                  concurrency=2)
    envoy.start()
    yield envoy
    envoy.cleanup()


def fresh_window():
    """Windows are minutes of the wall clock: start a test early in one, so
    that its requests all fall in the same window."""
    into = time.time() % 60
    if into > 40:
        time.sleep(60 - into + 0.3)


def chat(gateway, caller, messages=MESSAGES, stream=False, client=None):
    body = {"model": "gpt-4o", "messages": messages, "stream": stream}
    headers = {"authorization": f"Bearer {KEYS[caller]}"}
    url = gateway.url + "/v1/chat/completions"
    if stream:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
            return response, b"".join(response.iter_raw())
    return (client or httpx).post(url, json=body, headers=headers, timeout=30)


def worker_connections(gateway):
    """Connections each worker accepted, from Envoy's per-worker listener stats."""
    counts = {}
    for name, value in gateway.stats("downstream_cx_total").items():
        match = re.match(r"listener\.127\.0\.0\.1_\d+\.(worker_\d+)\.downstream_cx_total", name)
        if match:
            counts[match.group(1)] = int(value)
    return counts


def assert_limited(response, kind):
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == kind
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert 0 < int(response.headers["retry-after-ms"]) <= 60_000
    return error


def test_no_more_than_the_request_limit_pass_across_workers_from_concurrent_clients(
        gateway, upstream):
    fresh_window()
    before = worker_connections(gateway)

    def one(_):
        with httpx.Client() as client:  # a connection each: both workers serve them
            return chat(gateway, "burst", client=client)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(one, range(40)))
    served = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code != 200]
    assert len(served) == 10, [r.status_code for r in responses]
    for response in limited:
        error = assert_limited(response, "requests")
        assert "caller `burst` on requests per minute: limit 10, used 10" in error["message"]
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # Limited requests never reached the upstream.
    assert len(upstream.received) == 10
    after = worker_connections(gateway)
    assert all(after.get(w, 0) > before.get(w, 0) for w in ("worker_0", "worker_1")), after
    assert wait_for(gateway, "azure_openai_limited_total", 30, caller="burst",
                    limit="requests", scope="local") == 30
    # A limited caller does not affect another.
    assert chat(gateway, "free").status_code == 200


def test_the_headers_count_down_and_replace_azures_of_the_same_kind(gateway, upstream):
    fresh_window()
    seen = []
    for _ in range(3):
        response = chat(gateway, "counted")
        assert response.status_code == 200
        seen.append(response.headers["x-ratelimit-remaining-requests"])
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert re.fullmatch(r"\d+s|\d+ms", response.headers["x-ratelimit-reset-requests"])
        # The caller has no token limit: Azure's token header still comes through.
        assert response.headers["x-ratelimit-remaining-tokens"] == "9000"
        assert "x-ratelimit-limit-tokens" not in response.headers
    assert seen == ["4", "3", "2"]
    # Answers the filter makes itself carry them too.
    models = httpx.get(gateway.url + "/v1/models", timeout=10,
                       headers={"authorization": f"Bearer {KEYS['counted']}"})
    assert models.status_code == 200
    assert models.headers["x-ratelimit-remaining-requests"] == "1"
    # A caller without limits gets Azure's headers untouched.
    response = chat(gateway, "free")
    assert response.headers["x-ratelimit-remaining-requests"] == "41"
    assert "x-ratelimit-limit-requests" not in response.headers


def test_the_token_limit_bites_once_json_and_streamed_usage_are_charged(gateway, upstream):
    fresh_window()
    budget = LIMITS["budget"]["tokens_per_minute"]
    first = chat(gateway, "budget")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == str(budget)
    # A stream whose caller did not ask for usage: the filter asks, and
    # charges it; the stream is not cut though it takes the caller past its
    # budget.
    response, received = chat(gateway, "budget", messages=STREAMED, stream=True)
    assert response.status_code == 200
    assert received.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in received
    sent = json.loads(upstream.received[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    # The tokens are charged on the workers' next tick (within a second).
    deadline = time.monotonic() + 5
    while True:
        probe = httpx.get(gateway.url + "/v1/models", timeout=10,
                          headers={"authorization": f"Bearer {KEYS['budget']}"})
        if probe.status_code == 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert_limited(probe, "tokens")
    count = len(upstream.received)
    refused = chat(gateway, "budget")
    error = assert_limited(refused, "tokens")
    used = spend(MESSAGES) + spend(STREAMED)
    assert f"on tokens per minute: limit {budget}, used {used}" in error["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(upstream.received) == count == 2
    assert wait_for(gateway, "azure_openai_limited_total", 2, caller="budget",
                    limit="tokens", scope="local") == 2


def test_tokens_are_counted_down_in_the_headers(gateway, upstream):
    fresh_window()
    first = chat(gateway, "tokens-only")
    start = int(first.headers["x-ratelimit-remaining-tokens"])
    deadline = time.monotonic() + 5
    while True:
        time.sleep(0.3)
        later = chat(gateway, "tokens-only")
        remaining = int(later.headers["x-ratelimit-remaining-tokens"])
        if remaining < start or time.monotonic() > deadline:
            break
    assert start - remaining >= spend(MESSAGES)
    assert "x-ratelimit-limit-requests" not in later.headers


def test_the_openai_sdk_reads_the_refusal_as_a_rate_limit(gateway, upstream):
    fresh_window()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS["sdk"], max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.received) == 1


def test_the_limited_series_carries_its_labels(gateway):
    names = {(n, tuple(sorted(dict(ls)))) for n, ls in scrape(gateway)
             if n == "azure_openai_limited_total"}
    assert ("azure_openai_limited_total", ("caller", "limit", "scope")) in names
