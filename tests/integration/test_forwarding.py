"""What the upstream receives for requests the filter lets through."""

import concurrent.futures
import json
import socket

import httpx
import pytest
from conftest import EAST_KEY, OPS_KEY, TEAM_A_KEY, WEST_KEY, gateway_config
from harness import bootstrap, cluster, wasm_filter

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "model": "gpt-4o"}


def post(gateway, path, body, key=TEAM_A_KEY, headers=None, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"content-type": "application/json"}
    if key is not None:
        all_headers["authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    return httpx.post(gateway.url + path, content=data, headers=all_headers, timeout=30, **kwargs)


def test_chat_completion_reaches_the_deployment(gateway, west, east):
    body = json.dumps(CHAT, indent=2).encode() + b"\n"  # odd formatting must survive
    response = post(gateway, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hi"

    got = west.only()
    assert got.method == "POST"
    assert got.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert got.body == body
    assert got.header("host") == "acme-west.openai.azure.com"
    assert got.all("api-key") == [WEST_KEY]
    assert got.all("authorization") == []
    assert got.header("x-azure-openai-cluster") is None  # routing header stays inside Envoy
    assert got.header("content-type") == "application/json"
    assert int(got.header("content-length")) == len(body)
    assert east.received == []


@pytest.mark.parametrize("inbound, model, deployment, outbound", [
    ("/v1/completions", "gpt-35-turbo-instruct", "instruct-prod", "completions"),
    ("/v1/embeddings", "text-embedding-3-small", "embed-prod", "embeddings"),
    ("/v1/chat/completions", "gpt-4o", "gpt4o-prod", "chat/completions"),
])
def test_each_operation_maps_to_its_azure_path(gateway, west, inbound, model, deployment, outbound):
    body = {"model": model, "input": "x", "prompt": "y"}
    response = post(gateway, inbound, body, key=OPS_KEY)
    assert response.status_code == 200, response.text
    got = west.only()
    assert got.path == f"/openai/deployments/{deployment}/{outbound}?api-version=2024-10-21"
    assert json.loads(got.body) == body


def test_caller_query_string_is_not_forwarded(gateway, west):
    response = post(gateway, "/v1/chat/completions?api-version=1999-01-01&api-key=x&foo=bar", CHAT)
    assert response.status_code == 200
    assert west.only().path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"


def test_two_upstreams_reach_two_clusters(gateway, west, east):
    assert post(gateway, "/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"}).status_code == 200
    assert post(gateway, "/v1/chat/completions", CHAT).status_code == 200

    to_east = east.only()
    assert to_east.path == "/openai/deployments/mini-prod/chat/completions?api-version=2025-04-01-preview"
    assert to_east.all("api-key") == [EAST_KEY]
    assert to_east.header("host") == f"127.0.0.1:{east.port}"
    to_west = west.only()
    assert to_west.all("api-key") == [WEST_KEY]
    assert to_west.header("host") == "acme-west.openai.azure.com"


def test_forged_routing_header_is_ignored(gateway, west, east):
    headers = [("authorization", f"Bearer {TEAM_A_KEY}"), ("content-type", "application/json"),
               ("x-azure-openai-cluster", "azure_east"), ("x-azure-openai-cluster", "azure_east")]
    response = httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps(CHAT),
                          headers=headers, timeout=30)
    assert response.status_code == 200
    assert west.only().path.startswith("/openai/deployments/gpt4o-prod/")
    assert east.received == []


def test_caller_credentials_never_reach_azure(gateway, west):
    headers = [("api-key", TEAM_A_KEY), ("authorization", f"Bearer {OPS_KEY}"),
               ("content-type", "application/json")]
    response = httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps(CHAT),
                          headers=headers, timeout=30)
    assert response.status_code == 200
    got = west.only()
    assert got.all("api-key") == [WEST_KEY]
    assert got.all("authorization") == []
    raw = repr(got.headers)
    assert OPS_KEY not in raw and TEAM_A_KEY not in raw


def test_azure_style_api_key_header_authenticates(gateway, west):
    response = post(gateway, "/v1/chat/completions", CHAT, key=None, headers={"api-key": TEAM_A_KEY})
    assert response.status_code == 200
    assert west.only().all("api-key") == [WEST_KEY]


def test_other_caller_headers_pass_through(gateway, west):
    response = post(gateway, "/v1/chat/completions", CHAT,
                    headers={"x-request-id": "trace-123", "openai-organization": "org-1",
                             "user-agent": "OpenAI/Python 9"})
    assert response.status_code == 200
    got = west.only()
    assert got.header("x-request-id") == "trace-123"
    assert got.header("openai-organization") == "org-1"
    assert got.header("user-agent") == "OpenAI/Python 9"


def test_one_mebibyte_body_passes_intact(gateway, west):
    content = "A" * (1024 * 1024)
    body = json.dumps({"messages": [{"role": "user", "content": content}], "model": "gpt-4o"}).encode()
    assert len(body) > 1024 * 1024
    response = post(gateway, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert west.only().body == body


def test_chunked_request_body_is_reassembled(gateway, west):
    body = json.dumps(CHAT).encode()

    def pieces():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    response = httpx.post(gateway.url + "/v1/chat/completions", content=pieces(),
                          headers={"authorization": f"Bearer {TEAM_A_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert west.only().body == body


def test_http2_callers(gateway, west):
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        response = client.post(gateway.url + "/v1/chat/completions", json=CHAT,
                               headers={"authorization": f"Bearer {TEAM_A_KEY}"})
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200, response.text
        rejected = client.post(gateway.url + "/v1/chat/completions", json=CHAT)
        assert rejected.status_code == 401
        assert rejected.json()["error"]["code"] == "missing_api_key"
    got = west.only()
    assert got.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert got.all("api-key") == [WEST_KEY]
    assert got.all("authorization") == []


def test_concurrent_requests_across_workers(gateway, west, east):
    def one(i):
        model = "gpt-4o" if i % 2 else "gpt-4o-mini"
        body = {"model": model, "messages": [{"role": "user", "content": f"n{i}"}]}
        return post(gateway, "/v1/chat/completions", body).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200
    assert len(west.received) == 100 and len(east.received) == 100
    assert all(r.all("api-key") == [WEST_KEY] for r in west.received)
    assert all(r.all("api-key") == [EAST_KEY] for r in east.received)
    contents = sorted(json.loads(r.body)["messages"][0]["content"]
                      for r in west.received + east.received)
    assert contents == sorted(f"n{i}" for i in range(200))


def test_request_with_trailers(envoy_factory, west, east):
    """A chunked body ended by trailers (Envoy passes them on when the
    codec enables them): the trailers end the body for the filter."""
    config = bootstrap([wasm_filter(gateway_config(west.port, east.port), env_keys=["AZURE_WEST_KEY"])],
                       [cluster("azure_west", west.port), cluster("azure_east", east.port)])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_protocol_options"] = {"enable_trailers": True}
    envoy = envoy_factory(config, env={"AZURE_WEST_KEY": WEST_KEY}).start()

    body = json.dumps(CHAT).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
               b"Authorization: Bearer " + TEAM_A_KEY.encode() + b"\r\n"
               b"Transfer-Encoding: chunked\r\nTE: trailers\r\n\r\n"
               + b"%x\r\n%s\r\n" % (len(body), body) + b"0\r\nx-checksum: abc\r\n\r\n")
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            response += piece
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    got = west.only()
    assert got.body == body
    assert got.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert got.all("api-key") == [WEST_KEY]
