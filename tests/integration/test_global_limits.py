"""Global caller limits: two Envoys (2 workers each) built from
envoy/global-limits.yaml, running the real filter, share one rate-limit
service (tests/rls: Kuadrant's Limitador engine) backed by one real Redis
(Debian's redis-server). The service loads envoy/ratelimit/limitador-limits.yaml
with smaller numbers and longer windows, so that limits bite within a test and
no window ends during one."""

import json
import re
import threading
import time
from collections import Counter

import httpx
import pytest
import yaml
from harness import (ROOT, WASM, Envoy, RateLimitService, RecordingUpstream, RedisServer,
                     Reply, assert_openai_error, cluster, free_port)

EXAMPLE = ROOT / "envoy" / "global-limits.yaml"
LIMITADOR_LIMITS = ROOT / "envoy" / "ratelimit" / "limitador-limits.yaml"
RATELIMIT_CONFIG = ROOT / "envoy" / "ratelimit" / "ratelimit-config.yaml"

KEYS = {"team-a": "replace-me-team-a-key", "team-b": "replace-me-team-b-key",
        "ops": "replace-me-ops-key"}

# The shipped limits, by name, with the numbers the tests use.
TEST_LIMITS = {
    "requests_per_minute": 8,
    "ops_requests_per_minute": 1000,
    "tokens_per_minute": 100,
    "ops_tokens_per_minute": 1_000_000,
    "gpt4o_requests_per_minute": 4,
}
WINDOW = 3600  # seconds: longer than the whole module takes
PROMPT_TOKENS, COMPLETION_TOKENS = 15, 25
TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS  # what every answer of the stand-in used
# The upstream keys the example reads from Envoy's environment.
ENV = {"AZURE_WEST_KEY": "west-key", "AZURE_EAST_KEY": "east-key"}


def limits_file(tmp_path):
    limits = yaml.safe_load(LIMITADOR_LIMITS.read_text())
    assert {limit["name"] for limit in limits} == set(TEST_LIMITS), \
        "a limit was added to or removed from the shipped file: give it a test value"
    for limit in limits:
        limit.update(max_value=TEST_LIMITS[limit["name"]], seconds=WINDOW)
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(limits))
    return path


def answer(request):
    """Azure-like answers that used TOKENS tokens: JSON with usage, or SSE
    (a usage chunk at the end when the request asked for it)."""
    return answer_with_usage(request, usage=True)


def answer_without_usage(request):
    """The same answers without a usage: the filter charges 0 tokens."""
    return answer_with_usage(request, usage=False)


def answer_with_usage(request, usage):
    body = json.loads(request.body or b"{}")
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
             "total_tokens": TOKENS} if usage else None
    headers = {}
    if body.get("stream"):
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        chunks = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": word},
                                "finish_reason": None}]} for word in ("Hel", "lo")]
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if include_usage and usage:
            chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                           "model": "m", "choices": [], "usage": usage})
        events = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
        return Reply(200, {**headers, "content-type": "text/event-stream"}, events)
    return Reply(200, {**headers, "content-type": "application/json"}, json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "hi"}}],
        **({"usage": usage} if usage else {})}).encode())


def gateway_config(upstream_port, rls_port, failure_mode_deny=False):
    """envoy/global-limits.yaml with the built module, ports chosen by the OS,
    both Azure clusters sent to the recording upstream and the rate-limit
    service's cluster to `rls_port`."""
    config = json.loads(json.dumps(yaml.safe_load(EXAMPLE.read_text()))
                        .replace("/etc/envoy/azure_openai_filter.wasm", str(WASM)))
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    clusters = []
    for shipped in config["static_resources"]["clusters"]:
        if shipped["name"] == "rate_limit_service":
            local = cluster("rate_limit_service", rls_port)
            local["typed_extension_protocol_options"] = shipped["typed_extension_protocol_options"]
            clusters.append(local)
        else:
            clusters.append(cluster(shipped["name"], upstream_port))
    config["static_resources"]["clusters"] = clusters
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.wasm", "envoy.filters.http.header_to_metadata",
                     "envoy.filters.http.ratelimit", "envoy.filters.http.router"], names
    hcm["http_filters"][2]["typed_config"]["failure_mode_deny"] = failure_mode_deny
    return config


@pytest.fixture(scope="module")
def redis():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def rls(redis, tmp_path_factory):
    service = RateLimitService(redis.url, limits_file(tmp_path_factory.mktemp("limits"))).start()
    yield service
    service.cleanup()


@pytest.fixture(scope="module")
def upstream():
    server = RecordingUpstream("azure")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def envoys(upstream, rls):
    """Two Envoys of the fleet, both asking the one service."""
    started = []
    try:
        for _ in range(2):
            started.append(Envoy(gateway_config(upstream.port, rls.port), env=ENV).start())
        yield started
    finally:
        for envoy in started:
            envoy.cleanup()


@pytest.fixture(autouse=True)
def fresh(request):
    """Each test starts with no counters, no recorded requests and the
    stand-in's default answers."""
    if "redis" in request.fixturenames:
        request.getfixturevalue("redis").flush()
    if "rls" in request.fixturenames:
        request.getfixturevalue("rls").clear()
    if "upstream" in request.fixturenames:
        server = request.getfixturevalue("upstream")
        server.reset()
        server.responder = answer
    yield


def chat(client, envoy, caller, model="gpt-4o-mini", stream=False, include_usage=False):
    """One chat completion as `caller`; returns the httpx response, read."""
    headers = {"authorization": f"Bearer {KEYS[caller]}"}
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    response = client.post(envoy.url + "/v1/chat/completions", json=body, headers=headers)
    response.read()
    return response


def assert_limited(response):
    """Envoy's rate-limit 429, as the example's local_reply_config words it."""
    error = assert_openai_error(response, 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    retry_after = response.headers["retry-after"]
    assert int(retry_after) >= 1
    assert f"Please retry after {retry_after} seconds." in error["message"], error["message"]
    assert response.headers["x-envoy-ratelimited"] == "true"
    return error


def charges(requests):
    """The token charges among recorded requests: those Envoy sent when an
    answer ended, which carry the token descriptor alone."""
    return [r for r in requests if r["descriptors"]
            and all(dict(d["entries"]).get("kind") == "tokens" for d in r["descriptors"])]


def limited_count(envoy, expect=0, base=0):
    """azure_openai_limited_total{caller="team-a", limit="-", scope="global"}
    from /stats/prometheus, waiting (up to 5 s) until it reaches base +
    expect: workers flush their counts on their tick."""
    pattern = re.compile(r'^azure_openai_limited_total\{(.*)\} (\S+)$')
    deadline = time.monotonic() + 5
    while True:
        total = 0
        for line in httpx.get(envoy.admin + "/stats/prometheus", timeout=5).text.splitlines():
            match = pattern.match(line)
            if match and set(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == {
                    ("caller", "team-a"), ("limit", "-"), ("scope", "global")}:
                total += int(float(match.group(2)))
        if total >= base + expect or time.monotonic() > deadline:
            return total
        time.sleep(0.1)


def paid(requests):
    """The charges that added tokens. (A 0-token charge from the previous
    test's last answer can arrive after this test's start.)"""
    return [c for c in charges(requests) if c["descriptors"][0]["hits"] > 0]


def ratelimit_stats(envoy):
    """Envoy's rate-limit filter counts (ok, over_limit, error,
    failure_mode_allowed), summed over the Azure clusters."""
    totals = Counter()
    for name, value in envoy.stats("ratelimit").items():
        if name.startswith("cluster.azure_") and ".ratelimit." in name:
            totals[name.rsplit(".", 1)[1]] += int(value)
    return totals


# ---------------------------------------------------------------- what Envoy sends

def test_what_envoy_sends_the_service_at_the_start_and_at_the_end(envoys, rls, upstream):
    """At the start: the three descriptors of the route, 1 hit unless the
    descriptor says otherwise (the token check says 0); when the answer has
    ended: the token descriptor alone, with the tokens the answer used."""
    with httpx.Client(timeout=30) as client:
        response = chat(client, envoys[0], "team-a", model="gpt-4o")
    assert response.status_code == 200, response.text
    seen = rls.wait_for(lambda r: len(r) >= 2)
    start, done = seen
    assert start["domain"] == "azure_openai"
    assert start["hits_addend"] == 0  # the request-level field: unset
    assert [(d["entries"], d["hits_addend"]) for d in start["descriptors"]] == [
        ([["kind", "requests"], ["caller", "team-a"]], None),
        ([["kind", "tokens"], ["caller", "team-a"]], 0),
        ([["kind", "model_requests"], ["caller", "team-a"], ["model", "gpt-4o"]], None),
    ]
    assert [d["hits"] for d in start["descriptors"]] == [1, 0, 1]
    assert start["overall_code"] == "OK"
    assert [(d["entries"], d["hits_addend"]) for d in done["descriptors"]] == [
        ([["kind", "tokens"], ["caller", "team-a"]], TOKENS)]
    # The shipped limits each descriptor matched (names from the file).
    assert [[c["limit"] for c in d["counters"]] for d in start["descriptors"]] == [
        ["requests_per_minute"], ["tokens_per_minute"], ["gpt4o_requests_per_minute"]]
    # The headers were for Envoy only.
    sent = upstream.only()
    for name in ("x-azure-openai-caller", "x-azure-openai-model", "x-azure-openai-cluster"):
        assert sent.header(name) is None, name
    assert sent.header("authorization") is None


def test_requests_the_filter_refuses_never_reach_the_service(envoys, rls, upstream):
    with httpx.Client(timeout=30) as client:
        refused = client.post(envoys[0].url + "/v1/chat/completions",
                              json={"model": "gpt-4o", "messages": []},
                              headers={"authorization": "Bearer sk-not-a-caller"})
        assert_openai_error(refused, 401, "invalid_api_key")
        response = chat(client, envoys[0], "team-b")
    assert response.status_code == 200, response.text
    seen = rls.wait_for(lambda r: len(charges(r)) >= 1)
    assert all(dict(d["entries"])["caller"] == "team-b"
               for r in seen for d in r["descriptors"]), seen
    assert len(seen) == 2, seen
    assert len(upstream.received) == 1


# ---------------------------------------------------------------- limits across the fleet

def test_the_request_limit_holds_across_two_envoys(envoys, rls, upstream):
    """Concurrent clients on both Envoys (and so on their workers): exactly
    the limit passes in the window; the others get the 429 and never reach
    Azure; each Envoy refused what the service told it to. The answers
    report no usage here, so that the token limit stays out of it."""
    upstream.responder = answer_without_usage
    limit = TEST_LIMITS["requests_per_minute"]
    results = {0: [], 1: []}
    lock = threading.Lock()

    def client_thread(index):
        with httpx.Client(timeout=30) as client:
            for _ in range(5):
                response = chat(client, envoys[index], "team-a")
                with lock:
                    results[index].append(response)

    before = [ratelimit_stats(envoy) for envoy in envoys]
    before_limited = [limited_count(envoy) for envoy in envoys]
    threads = [threading.Thread(target=client_thread, args=(i % 2,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    everything = results[0] + results[1]
    assert len(everything) == 30
    codes = Counter(r.status_code for r in everything)
    assert codes == {200: limit, 429: 30 - limit}, codes
    for response in everything:
        if response.status_code == 429:
            assert_limited(response)
    assert len(upstream.received) == limit
    rls.wait_for(lambda r: len(charges(r)) >= limit)  # every answer's charge was sent
    for index, envoy in enumerate(envoys):
        stats = ratelimit_stats(envoy)
        stats.subtract(before[index])
        refused = sum(r.status_code == 429 for r in results[index])
        assert refused >= 15 - limit  # each Envoy sent 15
        assert stats["over_limit"] == refused, stats
        # The filter counts the refusals it saw pass (flushed on its tick).
        assert limited_count(envoy, refused, before_limited[index]) == \
            before_limited[index] + refused
        assert stats["ok"] == 15 - refused, stats
        assert stats.get("error", 0) == 0, stats


def test_a_limited_caller_does_not_affect_another(envoys, rls, upstream):
    upstream.responder = answer_without_usage  # the request limits alone
    limit = TEST_LIMITS["requests_per_minute"]
    with httpx.Client(timeout=30) as client:
        for i in range(limit):
            assert chat(client, envoys[i % 2], "team-a").status_code == 200
        assert_limited(chat(client, envoys[0], "team-a"))
        assert_limited(chat(client, envoys[1], "team-a"))
        # team-b has the same default limit, with its own counter; ops its own.
        for i in range(3):
            assert chat(client, envoys[i % 2], "team-b").status_code == 200
            assert chat(client, envoys[i % 2], "ops").status_code == 200
    assert len(upstream.received) == limit + 6


def test_the_token_limit_bites_once_usage_is_charged(envoys, rls, upstream):
    """Each answer used 40 tokens, charged when it ended (a JSON answer, a
    stream that asked for usage, one that did not): once 120 of the 100 are
    spent, the next request is refused, on the other Envoy too."""
    budget = TEST_LIMITS["tokens_per_minute"]
    with httpx.Client(timeout=30) as client:
        spent = 0
        for stream, include_usage in ((False, False), (True, True), (True, False)):
            assert spent <= budget
            response = chat(client, envoys[0], "team-a", stream=stream,
                            include_usage=include_usage)
            assert response.status_code == 200, response.text
            if stream:
                assert response.text.endswith("data: [DONE]\n\n")
                assert ('"usage"' in response.text) == include_usage, response.text
            spent += TOKENS
            # The charge is sent once the answer has ended: wait for it
            # before the next request is checked.
            rls.wait_for(lambda r, n=spent // TOKENS: len(paid(r)) >= n)
        assert spent > budget
        assert [c["descriptors"][0]["hits"] for c in paid(rls.requests())] == [TOKENS] * 3
        assert_limited(chat(client, envoys[1], "team-a"))
        assert_limited(chat(client, envoys[0], "team-a", stream=True))
        # Another caller's tokens are its own.
        assert chat(client, envoys[1], "team-b").status_code == 200
    assert len(upstream.received) == 4
    # The refused requests' ends charged nothing (Envoy still sends their
    # token descriptor, with the 0 the filter stored); team-b paid its own.
    seen = rls.wait_for(lambda r: len(charges(r)) >= 6 and len(paid(r)) >= 4)
    by_caller = Counter()
    for charge in charges(seen):
        by_caller[dict(charge["descriptors"][0]["entries"])["caller"]] += \
            charge["descriptors"][0]["hits"]
    # Only this test's callers: a 0-token charge of the previous test's `ops`
    # can come late (clear() waits for quiet, not for a promise).
    assert {c: by_caller[c] for c in ("team-a", "team-b")} == \
        {"team-a": 3 * TOKENS, "team-b": TOKENS}, by_caller
    assert sum(by_caller.values()) == 4 * TOKENS, by_caller


def test_the_model_limit_is_per_caller_and_model(envoys, rls, upstream):
    upstream.responder = answer_without_usage  # the request limits alone
    limit = TEST_LIMITS["gpt4o_requests_per_minute"]
    with httpx.Client(timeout=30) as client:
        for i in range(limit):
            assert chat(client, envoys[i % 2], "team-b", model="gpt-4o").status_code == 200
        assert_limited(chat(client, envoys[0], "team-b", model="gpt-4o"))
        # The caller's other model, and another caller on this model, pass.
        assert chat(client, envoys[1], "team-b", model="gpt-4o-mini").status_code == 200
        assert chat(client, envoys[0], "team-a", model="gpt-4o").status_code == 200
    assert len(upstream.received) == limit + 2


# ---------------------------------------------------------------- the service failing

def test_the_service_down_lets_requests_through(upstream, tmp_path):
    """failure_mode_deny: false (the example's choice): with nothing
    listening where the service should be, requests go through unlimited,
    and Envoy counts each as an error it allowed."""
    envoy = Envoy(gateway_config(upstream.port, free_port()), env=ENV).start()
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(TEST_LIMITS["requests_per_minute"] + 2):
                assert chat(client, envoy, "team-a").status_code == 200
        stats = ratelimit_stats(envoy)
    finally:
        envoy.cleanup()
    sent = TEST_LIMITS["requests_per_minute"] + 2
    assert len(upstream.received) == sent
    assert stats["error"] >= sent and stats["failure_mode_allowed"] >= sent, stats


def test_redis_down_lets_requests_through(upstream, tmp_path):
    """The service up but its Redis gone: it answers UNAVAILABLE (as
    limitador-server does), and Envoy fails open the same way."""
    redis = RedisServer().start()
    service = RateLimitService(redis.url, limits_file(tmp_path)).start()
    envoy = Envoy(gateway_config(upstream.port, service.port), env=ENV).start()
    try:
        with httpx.Client(timeout=30) as client:
            assert chat(client, envoy, "team-a").status_code == 200
            redis.stop()
            for _ in range(3):
                assert chat(client, envoy, "team-a").status_code == 200
        stats = ratelimit_stats(envoy)
        assert "storage error" in service.log()
    finally:
        envoy.cleanup()
        service.cleanup()
        redis.cleanup()
    assert len(upstream.received) == 4
    assert stats["error"] >= 3 and stats["failure_mode_allowed"] >= 3, stats


def test_failure_mode_deny_refuses_while_the_service_is_down(upstream, tmp_path):
    envoy = Envoy(gateway_config(upstream.port, free_port(), failure_mode_deny=True), env=ENV).start()
    try:
        with httpx.Client(timeout=30) as client:
            response = chat(client, envoy, "team-a")
        stats = ratelimit_stats(envoy)
    finally:
        envoy.cleanup()
    error = assert_openai_error(response, 503, "rate_limit_service_unavailable")
    assert error["type"] == "server_error"
    assert upstream.received == []
    assert stats["error"] >= 1 and stats.get("failure_mode_allowed", 0) == 0, stats


# ---------------------------------------------------------------- the two descriptor files

def ratelimit_match(config, entries):
    """envoyproxy/ratelimit's lookup: walk the descriptor's entries down the
    tree, an entry with the same value before one with the key alone; the
    limit is the one on the node the last entry reaches."""
    nodes = config["descriptors"]
    node = None
    for key, value in entries:
        candidates = [n for n in nodes if n["key"] == key and n.get("value") == value] or \
                     [n for n in nodes if n["key"] == key and "value" not in n]
        if not candidates:
            return None
        node = candidates[0]
        nodes = node.get("descriptors", [])
    return node.get("rate_limit") if node else None


UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def test_both_descriptor_files_describe_the_same_limits(envoys, rls):
    """For the descriptors Envoy really sent (each caller, on a model with and
    without a model limit), Limitador's engine with the shipped file and
    envoyproxy/ratelimit's lookup in its shipped file find the same limits."""
    shipped = {l["name"]: l for l in yaml.safe_load(LIMITADOR_LIMITS.read_text())}
    config = yaml.safe_load(RATELIMIT_CONFIG.read_text())
    assert config["domain"] == "azure_openai"
    assert {l["namespace"] for l in shipped.values()} == {"azure_openai"}
    with httpx.Client(timeout=30) as client:
        for caller in KEYS:
            for model in ("gpt-4o", "gpt-4o-mini"):
                assert chat(client, envoys[0], caller, model=model).status_code == 200
    seen = rls.wait_for(lambda r: len(charges(r)) >= 6)
    compared = 0
    for request in seen:
        for descriptor in request["descriptors"]:
            limits = [shipped[c["limit"]] for c in descriptor["counters"]]
            assert len(limits) <= 1, limits
            found = ratelimit_match(config, descriptor["entries"])
            if not limits:
                assert found is None, (descriptor, found)
                continue
            assert found is not None, descriptor
            assert (found["requests_per_unit"], UNIT_SECONDS[found["unit"]]) == \
                (limits[0]["max_value"], limits[0]["seconds"]), descriptor
            compared += 1
    assert compared >= 6 * 3
