"""Replies Envoy makes itself (431, 400, 404, 408, 413, 426, 501, 503, 504)
come out as OpenAI error JSON through the HCM `local_reply_config`; the
filter's own replies pass through byte for byte. Over HTTP/2, bodies up to
the filter's 32 MiB limit are forwarded (the stream window)."""

import json
import socket

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import yaml
from conftest import BODY_LIMIT, OPS_KEY, TEAM_A_KEY, WEST_KEY, gateway_config
from harness import (ENVOY_REPLIES, ROOT, Envoy, RecordingUpstream, Reply, assert_openai_error,
                     bootstrap, cluster, local_reply_config, wasm_filter)
from test_configs import EXAMPLE_ENV, EXAMPLES, local_copy

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
SECRET = "sk-caller-secret-0123456789"  # sent in requests; must never come back


def assert_envoy_error(response, status, code):
    """An Envoy-made reply in OpenAI's shape: type by status class, no
    param, nothing the caller sent."""
    error = assert_openai_error(response, status, code)
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), error
    assert error["param"] is None, error
    assert SECRET not in response.text and TEAM_A_KEY not in response.text
    return error


def raw_exchange(port, data, timeout=10):
    """Sends raw bytes and returns the first HTTP/1.1 response as an
    httpx.Response (parsed by hand: the request may be malformed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {received!r}"
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside the body"
            body += chunk
    return httpx.Response(status, headers=headers, content=body[:length])


def hcm_of(config):
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


# ------------------------------------------------- malformed requests (gateway)

@pytest.fixture
def nothing_forwarded(west, east):
    yield
    assert west.received == [] and east.received == [], "the request was forwarded"


AUTH = f"authorization: Bearer {TEAM_A_KEY}\r\n".encode()


def test_huge_header_is_431_json(gateway, nothing_forwarded):
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n" + AUTH
               + b"x-secret: " + SECRET.encode() + b"\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
    error = assert_envoy_error(raw_exchange(gateway.port, request), 431,
                               "request_headers_too_large")
    assert "headers" in error["message"]


@pytest.mark.parametrize("request_bytes, details", [
    (b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n" + AUTH + b"x-a: a\x00" + SECRET.encode()
     + b"\r\n\r\n", "http1.invalid_characters"),
    (b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n" + AUTH + b"x-a: \x01\r\n\r\n",
     "http1.invalid_characters"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n" + AUTH
     + b"content-length: 5\r\ncontent-length: 6\r\n\r\n{}", "http1.codec_error"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n" + AUTH
     + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", None),
    (b"GARBAGE\r\n\r\n", "http1.codec_error"),
], ids=["nul-in-header", "control-byte-in-header", "two-content-lengths",
        "content-length-and-chunked", "no-request-line"])
def test_malformed_request_is_400_json(gateway, nothing_forwarded, request_bytes, details):
    error = assert_envoy_error(raw_exchange(gateway.port, request_bytes), 400,
                               "malformed_request")
    if details:
        assert f"({details})" in error["message"], error["message"]


@pytest.mark.parametrize("path", [b"/v1/chat/completions#frag", b"/v1/models?limit=1#x"])
def test_fragment_in_path_is_400_json(gateway, nothing_forwarded, path):
    request = b"GET " + path + b" HTTP/1.1\r\nhost: gw\r\n" + AUTH + b"\r\n"
    error = assert_envoy_error(raw_exchange(gateway.port, request), 400, "invalid_path")
    assert "fragment" in error["message"]


def test_http_1_0_is_426_json(gateway, nothing_forwarded):
    request = b"POST /v1/chat/completions HTTP/1.0\r\nhost: gw\r\n" + AUTH + b"\r\n"
    error = assert_envoy_error(raw_exchange(gateway.port, request), 426, "upgrade_required")
    assert "HTTP/1.1" in error["message"]


@pytest.mark.parametrize("encoding", [b"gzip", b"gzip, chunked", b"identity"])
def test_unsupported_transfer_encoding_is_501_json(gateway, nothing_forwarded, encoding):
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n" + AUTH
               + b"transfer-encoding: " + encoding + b"\r\n\r\n0\r\n\r\n")
    error = assert_envoy_error(raw_exchange(gateway.port, request), 501,
                               "unsupported_transfer_encoding")
    assert "chunked" in error["message"]


# ------------------------------------------ the filter's own replies, unchanged

@pytest.mark.parametrize("case", ["invalid_api_key", "model_not_found", "request_too_large",
                                  "unknown_url"])
def test_filter_replies_pass_byte_for_byte(gateway, nothing_forwarded, case):
    """The filter's replies are not rewritten: same bytes (its key order,
    no newline added) and its own content-type."""
    headers = {"authorization": f"Bearer {TEAM_A_KEY}", "content-type": "application/json"}
    path, body = "/v1/chat/completions", json.dumps(CHAT).encode()
    if case == "invalid_api_key":
        headers["authorization"] = "Bearer sk-wrong"
        expected = (401, "Incorrect API key provided. Use a key issued for this gateway.",
                    None)
    elif case == "model_not_found":
        body = json.dumps({"model": "gpt-5"}).encode()
        expected = (404, "The model `gpt-5` does not exist or you do not have access to it.",
                    "model")
    elif case == "request_too_large":
        body = b'{"model":"gpt-4o","x":"' + b"a" * (BODY_LIMIT - 24) + b'"}'
        assert len(body) == BODY_LIMIT + 1
        expected = (413, f"The request body is larger than this gateway's limit of "
                         f"{BODY_LIMIT} bytes.", None)
    else:
        path = "/v1/nothing-here"
        expected = (404, "Invalid URL (POST /v1/nothing-here).", None)
    for http2 in (False, True):
        content = body
        if http2 and case == "request_too_large":
            # No content-length: the filter counts what arrives (over HTTP/2 a
            # client cannot keep sending once the stream was answered).
            content = iter([body])
        with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
            response = client.post(gateway.url + path, content=content, headers=headers)
        assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        status, message, param = expected
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.content == json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": param,
                       "code": case}}, separators=(",", ":")).encode()


# ------------------------------------------- upstream and routing failures

@pytest.fixture(scope="module")
def faults():
    """Envoy with the harness bootstrap and models whose cluster is missing,
    refuses connections, has no endpoint or has no route; 1 s route timeout,
    2 s stream idle timeout, a 1 MiB connection buffer (below the filter's
    2 MiB limit)."""
    west, east = RecordingUpstream("west"), RecordingUpstream("east")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    config = gateway_config(west.port, east.port)
    east_upstream = config["upstreams"]["east"]
    for name, cluster_name in [("ghost", "no-such-cluster"), ("quoted", 'no"such\\cluster'),
                               ("refused", "refused"), ("empty", "empty")]:
        config["upstreams"][name] = dict(east_upstream, cluster=cluster_name)
        config["models"][name] = {"upstream": name, "deployment": f"{name}-prod"}
    config["upstreams"]["unrouted"] = {
        "kind": "openai", "endpoint": f"http://127.0.0.1:{east.port}/unrouted/v1",
        "cluster": "azure_east", "auth": {"bearer": {"value": "vllm-token"}}}
    config["models"]["unrouted"] = {"upstream": "unrouted", "deployment": "llama"}
    empty = cluster("empty", 1)
    empty["load_assignment"]["endpoints"] = []
    envoy_config = bootstrap(
        [wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
        [cluster("azure_west", west.port), cluster("azure_east", east.port),
         cluster("refused", closed_port), empty],
        buffer_limit=1024 * 1024)
    hcm = hcm_of(envoy_config)
    hcm["stream_idle_timeout"] = "2s"
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["match"] = {"prefix": "/openai/"}  # the `unrouted` upstream's path has no route
    route["route"]["timeout"] = "1s"
    envoy = Envoy(envoy_config, env={"AZURE_WEST_KEY": WEST_KEY}).start()
    envoy.west, envoy.east = west, east
    yield envoy
    envoy.cleanup()
    west.stop()
    east.stop()


@pytest.fixture
def fault(faults):
    faults.west.reset()
    faults.east.reset()
    yield faults
    faults.west.reset()
    faults.east.reset()


def chat(envoy, model, http2=False, **kwargs):
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
        return client.post(envoy.url + "/v1/chat/completions",
                           json=dict(CHAT, model=model), **kwargs,
                           headers={"authorization": f"Bearer {OPS_KEY}",
                                    "x-secret": SECRET})


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_cluster_missing_from_envoy_is_503_naming_it(fault, http2):
    error = assert_envoy_error(chat(fault, "ghost", http2=http2), 503, "cluster_not_found")
    # Read from the routing header, which the route removes only upstream.
    assert "`no-such-cluster`" in error["message"], error["message"]
    assert fault.west.received == [] and fault.east.received == []


def test_cluster_name_is_json_escaped(fault):
    error = assert_envoy_error(chat(fault, "quoted"), 503, "cluster_not_found")
    assert '`no"such\\cluster`' in error["message"], error["message"]


def test_cluster_not_found_names_a_configured_cluster_header(envoy_factory, west, east):
    """The mapper reads the routing header the filter is configured with."""
    config = gateway_config(west.port, east.port)
    config["cluster_header"] = "x-route-to"
    config["upstreams"]["east"]["cluster"] = "not-in-envoy"
    envoy = envoy_factory(bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                                    [cluster("azure_west", west.port)],
                                    cluster_header="x-route-to"),
                          env={"AZURE_WEST_KEY": WEST_KEY}).start()
    response = httpx.post(envoy.url + "/v1/chat/completions", json=dict(CHAT, model="gpt-4o-mini"),
                          headers={"authorization": f"Bearer {TEAM_A_KEY}"}, timeout=30)
    error = assert_envoy_error(response, 503, "cluster_not_found")
    assert "`not-in-envoy`" in error["message"]
    assert east.received == []


def test_connection_refused_is_503_json(fault):
    error = assert_envoy_error(chat(fault, "refused"), 503, "upstream_unavailable")
    assert "Connection_refused" in error["message"], error["message"]


def test_upstream_reset_before_headers_is_503_json(fault):
    fault.west.responder = lambda request: Reply(raw=b"")
    error = assert_envoy_error(chat(fault, "gpt-4o"), 503, "upstream_unavailable")
    assert "connection_termination" in error["message"], error["message"]
    assert len(fault.west.received) == 1  # it did reach the upstream, which hung up


def test_upstream_protocol_error_is_502_json(fault):
    fault.west.responder = lambda request: Reply(raw=b"HTTP/1.1 200 OK\r\ncontent-le")
    assert_envoy_error(chat(fault, "gpt-4o"), 502, "upstream_unavailable")


def test_no_healthy_upstream_is_503_json(fault):
    assert_envoy_error(chat(fault, "empty"), 503, "no_healthy_upstream")


def test_upstream_timeout_is_504_json(fault):
    fault.west.responder = lambda request: Reply(delay=3)
    error = assert_envoy_error(chat(fault, "gpt-4o"), 504, "upstream_timeout")
    assert "(response_timeout)" in error["message"], error["message"]


def test_no_route_is_404_json(fault):
    assert_envoy_error(chat(fault, "unrouted"), 404, "route_not_found")
    assert fault.east.received == []


def test_body_over_envoys_buffer_limit_is_413_json(fault):
    """The misconfiguration: per_connection_buffer_limit_bytes (1 MiB here)
    below max_request_body_bytes (2 MiB). Envoy answers, in JSON."""
    body = json.dumps(dict(CHAT, pad="a" * (1536 * 1024))).encode()
    with httpx.Client(timeout=30) as client:
        response = client.post(fault.url + "/v1/chat/completions", content=body,
                               headers={"authorization": f"Bearer {OPS_KEY}",
                                        "content-type": "application/json"})
    error = assert_envoy_error(response, 413, "request_too_large")
    assert "per_connection_buffer_limit_bytes" in error["message"]
    assert fault.west.received == []


def test_filter_413_is_still_the_filters_own(fault):
    """Declared over the filter's limit: the filter answers before Envoy buffers."""
    body = json.dumps(dict(CHAT, pad="a" * (3 * 1024 * 1024))).encode()
    response = httpx.post(fault.url + "/v1/chat/completions", content=body, timeout=30,
                          headers={"authorization": f"Bearer {OPS_KEY}",
                                   "content-type": "application/json"})
    error = assert_openai_error(response, 413, "request_too_large")
    assert error["message"] == (f"The request body is larger than this gateway's limit of "
                                f"{BODY_LIMIT} bytes.")
    assert response.content.startswith(b'{"error":{"message":')
    assert fault.west.received == []


def test_stalled_request_is_408_json(fault):
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
               + f"authorization: Bearer {OPS_KEY}\r\n".encode()
               + b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
    error = assert_envoy_error(raw_exchange(fault.port, request), 408, "request_timeout")
    assert "(stream_idle_timeout)" in error["message"], error["message"]
    assert fault.west.received == []


# --------------------------------------------- HTTP/2 bodies up to the limit

LIMIT = 33554432  # the filter's default max_request_body_bytes


@pytest.fixture(scope="module")
def big():
    """Envoy with the harness bootstrap and the filter's default body limit."""
    upstream = RecordingUpstream("big")
    config = gateway_config(upstream.port, upstream.port)
    del config["max_request_body_bytes"]
    envoy = Envoy(bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                            [cluster("azure_west", upstream.port),
                             cluster("azure_east", upstream.port)]),
                  env={"AZURE_WEST_KEY": WEST_KEY}).start()
    envoy.upstream = upstream
    yield envoy
    envoy.cleanup()
    upstream.stop()


def json_body(size):
    head = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}],"pad":"'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def h2_post(envoy, body, stream):
    envoy.upstream.reset()
    content = body
    if stream:  # no content-length: DATA frames until the end of the stream
        content = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    with httpx.Client(http1=False, http2=True, timeout=60) as client:
        response = client.post(envoy.url + "/v1/chat/completions", content=content,
                               headers={"authorization": f"Bearer {TEAM_A_KEY}",
                                        "content-type": "application/json"})
    assert response.http_version == "HTTP/2"
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "streamed"])
def test_http2_body_at_the_limit_is_forwarded(big, stream):
    body = json_body(LIMIT)
    response = h2_post(big, body, stream)
    assert response.status_code == 200, response.text[:300]
    received = big.upstream.only()
    assert received.path.startswith("/openai/deployments/gpt4o-prod/chat/completions")
    assert received.body == body


def test_http2_streamed_body_over_the_limit_gets_the_filters_413(big):
    response = h2_post(big, json_body(LIMIT + 1), stream=True)
    error = assert_openai_error(response, 413, "request_too_large")
    assert error["message"] == (f"The request body is larger than this gateway's limit of "
                                f"{LIMIT} bytes.")
    assert big.upstream.received == []


def test_http2_declared_body_over_the_limit_gets_the_filters_413(big):
    """content-length over the limit: refused on the headers (raw h2: the
    client must not have to send the body)."""
    big.upstream.reset()
    with socket.create_connection(("127.0.0.1", big.port), timeout=10) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", "/v1/chat/completions"),
                              (":scheme", "http"), (":authority", "gw"),
                              ("authorization", f"Bearer {TEAM_A_KEY}"),
                              ("content-type", "application/json"),
                              ("content-length", str(LIMIT + 1))])
        sock.sendall(conn.data_to_send())
        status, headers, body, ended = None, {}, b"", False
        for _ in range(100):
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
            if ended:
                break
    response = httpx.Response(status, headers={"content-type": headers["content-type"]},
                              content=body)
    assert_openai_error(response, 413, "request_too_large")
    assert body.startswith(b'{"error":{"message":"The request body is larger than this gateway')
    assert big.upstream.received == []


# ------------------------------------------------------- shipped examples

@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_has_the_reply_block_and_http2_window(example):
    config = yaml.safe_load(example.read_text())
    listener = config["static_resources"]["listeners"][0]
    hcm = hcm_of(config)
    assert hcm["local_reply_config"] == local_reply_config("x-azure-openai-cluster")
    windows = hcm["http2_protocol_options"]
    limit = listener["per_connection_buffer_limit_bytes"]
    assert windows["initial_stream_window_size"] == limit > LIMIT
    assert windows["initial_connection_window_size"] >= limit


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_answers_in_openai_json(envoy_factory, tmp_path, example):
    """Each shipped config, started as is: Envoy's 431 is JSON, the filter's
    401 is unchanged; the demo (no stand-in running) also gives a JSON 503."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    envoy = envoy_factory(local_copy(example, tmp_path, upstream_port=closed_port),
                          env=EXAMPLE_ENV).start()
    request = (b"GET /v1/models HTTP/1.1\r\nhost: gw\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert_envoy_error(raw_exchange(envoy.port, request), 431, "request_headers_too_large")
    request = b"GET /v1/models#x HTTP/1.1\r\nhost: gw\r\n\r\n"
    assert_envoy_error(raw_exchange(envoy.port, request), 400, "invalid_path")
    response = httpx.post(envoy.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert_openai_error(response, 401, "missing_api_key")
    assert response.content.startswith(b'{"error":{"message":')
    if example.name in ("demo.yaml", "native.yaml"):
        response = httpx.post(envoy.url + "/v1/chat/completions", json=CHAT, timeout=10,
                              headers={"authorization": "Bearer sk-demo-team-a"})
        assert_envoy_error(response, 503, "upstream_unavailable")


def test_readme_shows_the_shipped_reply_block():
    """The README's local_reply_config excerpt matches the examples' block,
    and its table lists every code."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Envoy settings it needs"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    shown = yaml.safe_load(section[start:section.index("```", start)])
    full = local_reply_config("x-azure-openai-cluster")["mappers"]
    assert shown["local_reply_config"]["mappers"][0] == full[0]
    assert all(mapper in full for mapper in shown["local_reply_config"]["mappers"])
    assert set(shown["http2_protocol_options"]) == {"initial_stream_window_size",
                                                    "initial_connection_window_size"}
    for _, _, code, _ in ENVOY_REPLIES:
        assert f"`{code}`" in section, code
