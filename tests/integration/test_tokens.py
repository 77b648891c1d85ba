"""Entra ID and managed-identity upstreams in a real Envoy (2 workers): the
token lifecycle, against a token-endpoint stand-in that counts requests."""

import concurrent.futures
import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import TEAM_A_KEY
from harness import (FILTER_LOG_COMPONENT, FILTER_LOG_MARK, STATS_NAMESPACE, Envoy, RecordingUpstream, Reply, assert_openai_error, bootstrap,
                     cluster, sha256_hex, wasm_filter)

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "client-secret~with+odd&chars"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}


class TokenEndpoint(RecordingUpstream):
    """Answers token requests with fresh tokens `tok-<n>` living `lifetime`
    seconds (as a number, or a string like IMDS), or as `self.mode` says.
    Remembers when each token was issued."""

    def __init__(self, lifetime=3600, as_string=False, delay=0.0, port=0):
        super().__init__("identity", port)
        self.lifetime, self.as_string, self.delay = lifetime, as_string, delay
        self.issued = {}
        self.mode = "ok"
        self.lock = threading.Lock()
        self.responder = self.answer

    def answer(self, request):
        if self.mode == "invalid_client":
            body = {"error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided. "
                                         "Trace ID: x Correlation ID: y",
                    "error_codes": [7000215]}
            return Reply(401, {"content-type": "application/json"}, json.dumps(body).encode())
        if self.mode == "500":
            return Reply(500, {"content-type": "text/plain"}, b"internal error")
        if self.mode == "close":
            return Reply(raw=b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 500\r\n\r\n{\"access_tok")
        if self.mode == "slow":
            return Reply(200, {"content-type": "application/json"}, b"{}", delay=2.0)
        with self.lock:
            token = f"tok-{len(self.issued) + 1}"
            self.issued[token] = time.monotonic()
        lifetime = str(self.lifetime) if self.as_string else self.lifetime
        body = {"token_type": "Bearer", "expires_in": lifetime, "access_token": token}
        return Reply(200, {"content-type": "application/json"}, json.dumps(body).encode(),
                     delay=self.delay)

    def tokens_issued(self):
        return len(self.issued)


def entra_config(upstream, identity, **auth):
    entra = {"tenant_id": TENANT, "client_id": CLIENT_ID,
             "client_secret": {"env": "AZURE_CLIENT_SECRET"},
             "token_cluster": "entra", "authority_host": f"http://127.0.0.1:{identity.port}"}
    entra.update(auth)
    return gateway(upstream, {"entra": entra})


def gateway(upstream, auth):
    return {
        "upstreams": {"west": {"endpoint": f"http://127.0.0.1:{upstream.port}",
                               "cluster": "azure_west", "auth": auth}},
        "models": {"gpt-4o": {"upstream": "west", "deployment": "gpt4o-prod"}},
        "callers": [{"name": "team-a", "key_sha256": sha256_hex(TEAM_A_KEY), "models": ["*"]}],
    }


def start(envoy_factory, filter_config, upstream, identity, cluster_name="entra", **kwargs):
    config = bootstrap([wasm_filter(filter_config, env_keys=["AZURE_CLIENT_SECRET"])],
                       [cluster("azure_west", upstream.port), cluster(cluster_name, identity.port)])
    return envoy_factory(config, env={"AZURE_CLIENT_SECRET": CLIENT_SECRET}, **kwargs).start()


def chat(envoy, timeout=30):
    return httpx.post(envoy.url + "/v1/chat/completions", json=CHAT, timeout=timeout,
                      headers={"authorization": f"Bearer {TEAM_A_KEY}"})


def stat(envoy, name):
    return int(envoy.stats("azure_openai_filter").get(f"{STATS_NAMESPACE}.azure_openai_filter.{name}", 0))


@pytest.fixture
def upstream():
    server = RecordingUpstream("azure")
    yield server
    server.stop()


@pytest.fixture
def identity():
    endpoints = []

    def make(**kwargs):
        endpoint = TokenEndpoint(**kwargs)
        endpoints.append(endpoint)
        return endpoint

    yield make
    for endpoint in endpoints:
        endpoint.stop()


def bearer_of(request):
    assert request.all("api-key") == []
    values = request.all("authorization")
    assert len(values) == 1 and values[0].startswith("Bearer tok-"), values
    return values[0].removeprefix("Bearer ")


def test_cold_start_fetches_one_token_for_50_concurrent_requests(envoy_factory, upstream, identity):
    endpoint = identity(delay=1.0)  # the token arrives after the requests
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: chat(envoy).status_code, range(50)))
    assert statuses == [200] * 50
    assert len(endpoint.received) == 1
    assert len(upstream.received) == 50
    assert {bearer_of(r) for r in upstream.received} == {"tok-1"}
    assert stat(envoy, "token_fetches") == 1
    assert stat(envoy, "requests_waiting_for_token") == 0


def test_token_request_is_client_credentials(envoy_factory, upstream, identity):
    endpoint = identity()
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint)
    assert chat(envoy).status_code == 200
    got = endpoint.only()
    assert got.method == "POST"
    assert got.path == f"/{TENANT}/oauth2/v2.0/token"
    assert got.header("content-type") == "application/x-www-form-urlencoded"
    form = parse_qs(got.body.decode(), strict_parsing=True)
    assert form == {"grant_type": ["client_credentials"], "client_id": [CLIENT_ID],
                    "client_secret": [CLIENT_SECRET],
                    "scope": ["https://cognitiveservices.azure.com/.default"]}
    assert bearer_of(upstream.only()) == "tok-1"
    assert upstream.only().path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"


def test_usgov_sends_the_usgov_scope(envoy_factory, upstream, identity):
    endpoint = identity()
    envoy = start(envoy_factory, entra_config(upstream, endpoint, cloud="usgov"), upstream, endpoint)
    assert chat(envoy).status_code == 200
    form = parse_qs(endpoint.only().body.decode())
    assert form["scope"] == ["https://cognitiveservices.azure.us/.default"]


def test_steady_traffic_with_short_tokens_never_waits_or_fails(envoy_factory, upstream, identity):
    endpoint = identity(lifetime=4)
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint)
    assert chat(envoy).status_code == 200  # warm-up: the first token is in
    held_after_warm_up = stat(envoy, "requests_held_for_token")

    failures = []
    stop = time.monotonic() + 15

    def traffic():
        while time.monotonic() < stop:
            response = chat(envoy, timeout=10)
            if response.status_code != 200:
                failures.append(response.text)
            time.sleep(0.05)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    # Refreshes start at 50-60% of the 4 s lifetime: about one per 2.2 s.
    fetches = len(endpoint.received)
    print(f"token requests in 15 s of traffic with 4 s tokens: {fetches}")
    assert 6 <= fetches <= 10, fetches
    assert stat(envoy, "requests_held_for_token") == held_after_warm_up
    # Every request carried a token that had not expired when it arrived.
    for request in upstream.received:
        token = bearer_of(request)
        assert request.at < endpoint.issued[token] + 4.0, token
    assert len({bearer_of(r) for r in upstream.received}) >= 6


def test_identity_endpoint_down_at_start_then_back(envoy_factory, upstream):
    down = TokenEndpoint()
    port = down.port
    down.stop()  # nothing listens there now
    config = gateway(upstream, {"entra": {
        "tenant_id": TENANT, "client_id": CLIENT_ID, "client_secret": {"env": "AZURE_CLIENT_SECRET"},
        "token_cluster": "entra", "authority_host": f"http://127.0.0.1:{port}",
        "max_wait_ms": 1500}})
    envoy = start(envoy_factory, config, upstream, down)

    started = time.monotonic()
    response = chat(envoy)
    elapsed = time.monotonic() - started
    error = assert_openai_error(response, 503, "token_unavailable")
    assert elapsed < 3.0, elapsed  # within the 1.5 s bound (plus a tick)
    assert "upstream `west`" in error["message"]
    assert "could not be reached" in error["message"], error["message"]
    assert upstream.received == []

    back = TokenEndpoint(port=port)  # the endpoint comes back, same address
    try:
        deadline = time.monotonic() + 40
        while chat(envoy).status_code != 200:
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.5)
        assert bearer_of(upstream.received[-1]) == "tok-1"
        assert len(back.received) == 1
    finally:
        back.stop()
    assert "panicked" not in envoy.log()


def test_invalid_client_is_named_and_not_retried_hot(envoy_factory, upstream, identity):
    endpoint = identity()
    endpoint.mode = "invalid_client"
    envoy = start(envoy_factory, entra_config(upstream, endpoint, max_wait_ms=3000), upstream, endpoint)
    started = time.monotonic()
    error = assert_openai_error(chat(envoy), 503, "token_unavailable")
    assert "401 invalid_client (AADSTS7000215)" in error["message"], error["message"]
    assert CLIENT_SECRET not in error["message"]
    # Keep asking for 8 s: the endpoint sees a bounded number of requests.
    while time.monotonic() - started < 8:
        assert chat(envoy).status_code == 503
        time.sleep(0.2)
    attempts = len(endpoint.received)
    print(f"token requests in 8 s of invalid_client: {attempts}")
    assert 2 <= attempts <= 8, attempts
    assert envoy.wait_for_log("AADSTS7000215")  # the warning names the code
    assert upstream.received == []


@pytest.mark.parametrize("mode, reason", [
    ("close", "closed the connection"),
    ("500", "answered 500"),
    ("slow", "did not answer in time"),
])
def test_misbehaving_endpoint_is_handled(envoy_factory, upstream, identity, mode, reason):
    endpoint = identity()
    endpoint.mode = mode
    config = entra_config(upstream, endpoint, timeout_ms=500, max_wait_ms=1200)
    envoy = start(envoy_factory, config, upstream, endpoint)
    error = assert_openai_error(chat(envoy), 503, "token_unavailable")
    assert reason in error["message"], error["message"]
    endpoint.mode = "ok"
    deadline = time.monotonic() + 20
    while chat(envoy).status_code != 200:
        assert time.monotonic() < deadline, "no recovery"
        time.sleep(0.3)
    log = envoy.log()
    assert "panicked" not in log and "Wasm VM failed" not in log


def test_failed_refresh_keeps_the_current_token_until_it_expires(envoy_factory, upstream, identity):
    endpoint = identity(lifetime=4)
    envoy = start(envoy_factory, entra_config(upstream, endpoint, max_wait_ms=500), upstream, endpoint)
    assert chat(envoy).status_code == 200
    issued = endpoint.issued["tok-1"]
    endpoint.mode = "500"
    # Refreshes fail from here; the token stays in use while it is valid...
    while time.monotonic() < issued + 3.2:
        response = chat(envoy)
        assert response.status_code == 200, response.text
        assert bearer_of(upstream.received[-1]) == "tok-1"
        time.sleep(0.1)
    assert envoy.wait_for_log("still using the current token")
    # ...and never after.
    time.sleep(max(0.0, issued + 4.0 - time.monotonic()))
    error = assert_openai_error(chat(envoy), 503, "token_unavailable")
    assert "answered 500" in error["message"]
    for request in upstream.received:
        assert request.at < issued + 4.0


def test_a_refresh_reaches_every_worker_when_its_sender_goes_quiet(envoy_factory, upstream, identity):
    """The refresh leaves from the worker carrying the traffic; from then on
    only the other worker does. The new token still reaches it at once, with
    no second fetch (in Wasm the sender's root takes the answer; the native
    module hands it to whichever worker has a stream open)."""
    # 6 s tokens: refreshed 3.0-3.6 s in, usable 5.4 s. Each answer takes
    # 0.3 s, so the refresh's comes when its sender has no stream open.
    endpoint = identity(lifetime=6, delay=0.3)
    config = bootstrap([wasm_filter(entra_config(upstream, endpoint), env_keys=["AZURE_CLIENT_SECRET"])],
                       [cluster("azure_west", upstream.port), cluster("entra", endpoint.port)])
    # One connection per worker: each new connection goes to the worker
    # with the fewest.
    listener = config["static_resources"]["listeners"][0]
    listener["enable_reuse_port"] = False
    listener["connection_balance_config"] = {"exact_balance": {}}
    envoy = envoy_factory(config, env={"AZURE_CLIENT_SECRET": CLIENT_SECRET}).start()

    def send(client):
        response = client.post(envoy.url + "/v1/chat/completions", json=CHAT,
                               headers={"authorization": f"Bearer {TEAM_A_KEY}"})
        assert response.status_code == 200, response.text
        return bearer_of(upstream.received[-1])

    with httpx.Client(timeout=10) as busy, httpx.Client(timeout=10) as quiet_then_busy:
        assert send(busy) == "tok-1"
        assert send(quiet_then_busy) == "tok-1"
        issued = endpoint.issued["tok-1"]
        workers = envoy.stats("listener.127.0.0.1_")
        active = sorted(int(v) for k, v in workers.items()
                        if ".worker_" in k and k.endswith(".downstream_cx_active"))
        assert active == [1, 1], workers
        # Traffic on the first connection's worker until it has refreshed...
        while "tok-2" not in endpoint.issued:
            assert time.monotonic() < issued + 4.5, "no refresh"
            send(busy)
            time.sleep(0.05)
        # ...then on the other worker's alone: it uses the new token while
        # the old one is still good (else it would go on with tok-1, then
        # wait for the first fetch's lease to end and fetch one itself).
        while send(quiet_then_busy) != "tok-2":
            assert time.monotonic() < issued + 5.0, "the other worker never got tok-2"
            time.sleep(0.05)
    assert endpoint.tokens_issued() == 2


def test_caller_disconnecting_while_held_leaves_nothing(envoy_factory, upstream, identity):
    # The token takes 4 s (longer than the six callers' 0.3 s each, with
    # room for a slow machine).
    endpoint = identity(delay=4.0)
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint)
    for _ in range(6):
        with pytest.raises(httpx.ReadTimeout):
            chat(envoy, timeout=0.3)
    time.sleep(4.5)  # the token arrives after the callers left
    assert stat(envoy, "requests_waiting_for_token") == 0
    assert upstream.received == []
    assert chat(envoy).status_code == 200
    assert len(upstream.received) == 1
    log = envoy.log()
    assert "panicked" not in log and "Wasm VM failed" not in log


def test_managed_identity_through_imds(envoy_factory, upstream, identity):
    imds = identity(lifetime=86399, as_string=True)
    config = gateway(upstream, {"managed_identity": {"imds_cluster": "imds", "client_id": CLIENT_ID}})
    envoy = start(envoy_factory, config, upstream, imds, cluster_name="imds")
    assert chat(envoy).status_code == 200
    got = imds.only()
    assert got.method == "GET"
    assert got.header("metadata") == "true"
    url = urlsplit(got.path)
    assert url.path == "/metadata/identity/oauth2/token"
    assert parse_qs(url.query) == {"api-version": ["2018-02-01"], "client_id": [CLIENT_ID],
                                   "resource": ["https://cognitiveservices.azure.com/"]}
    assert got.header("host") == "169.254.169.254"
    assert got.body == b""
    assert bearer_of(upstream.only()) == "tok-1"


def test_no_secret_or_token_in_the_filters_logs(envoy_factory, upstream, identity):
    endpoint = identity(lifetime=3)
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint)
    for _ in range(4):
        assert chat(envoy).status_code == 200
    time.sleep(2.5)  # a refresh happens
    assert chat(envoy).status_code == 200
    log = envoy.log()
    assert "token for upstream `west` obtained" in log
    assert len(endpoint.issued) >= 2
    for secret in [CLIENT_SECRET, "client-secret", TEAM_A_KEY, *endpoint.issued]:
        assert secret not in log, secret


def test_envoy_trace_logs_carry_no_client_secret(envoy_factory, upstream, identity):
    """At Envoy's trace level everywhere: the client secret (in the token
    request body) and the token endpoint's answers never appear. Envoy's own
    header dumps do print the upstream request's Authorization header (Envoy
    has no redaction), so tokens show there and only there."""
    endpoint = identity()
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint,
                  log_level="trace", component_log_level="")
    assert chat(envoy).status_code == 200
    log = envoy.log()
    assert FILTER_LOG_MARK in log
    assert CLIENT_SECRET not in log and "client-secret" not in log
    assert '"access_token"' not in log
    for line in log.splitlines():
        if "tok-1" in line:
            assert FILTER_LOG_COMPONENT not in line, line
            assert "Bearer tok-1" in line, line


def test_unknown_token_cluster_is_named(envoy_factory, upstream, identity):
    endpoint = identity()
    config = entra_config(upstream, endpoint, token_cluster="no_such_cluster", max_wait_ms=1000)
    envoy = start(envoy_factory, config, upstream, endpoint)
    error = assert_openai_error(chat(envoy), 503, "token_unavailable")
    assert "Envoy has no cluster `no_such_cluster`" in error["message"], error["message"]
    assert endpoint.received == [] and upstream.received == []


def test_request_held_on_its_headers_keeps_its_body(envoy_factory, upstream, identity):
    """An Azure-style request is forwarded on its headers; when it has to
    wait for a token, its body waits with it and goes through whole."""
    endpoint = identity(delay=1.0)
    envoy = start(envoy_factory, entra_config(upstream, endpoint), upstream, endpoint)
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode()

    def pieces():
        for i in range(0, len(body), 16_384):
            yield body[i:i + 16_384]
            time.sleep(0.01)

    response = httpx.post(envoy.url + "/openai/deployments/gpt-4o/chat/completions?api-version=2023-05-15",
                          content=pieces(), headers={"api-key": TEAM_A_KEY}, timeout=30)
    assert response.status_code == 200, response.text
    got = upstream.only()
    assert got.body == body
    assert got.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert bearer_of(got) == "tok-1"
    assert stat(envoy, "requests_held_for_token") == 1
