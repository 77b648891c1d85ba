"""Hardening: what an adversarial review found, each through a real Envoy with
recording upstreams. Bodies an upstream parser could read differently are
refused, limits hold for every path, compressed Azure errors are still
translated, stored-response queries carry no credential, and a missing
allow_on_headers_stop_iteration is answered, not left hanging."""

import gzip
import json
import socket
import time

import httpx
import pytest
from harness import (Envoy, wasm_only, RecordingUpstream, Reply, assert_openai_error, bootstrap, cluster,
                     sha256_hex, wasm_filter)

KEY = "sk-hardening-caller-0001"
OPS_KEY = "sk-hardening-ops-0002"
AZURE_KEY = "hardening-azure-key"
V1_KEY = "hardening-v1-key"
LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def upstreams():
    servers = {name: RecordingUpstream(name) for name in ("azure", "v1", "vllm")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh(upstreams):
    for server in upstreams.values():
        server.reset()
    yield


def gateway_config(upstreams):
    return {
        "max_request_body_bytes": LIMIT,
        "responses_upstream": "azure",
        "upstreams": {
            "azure": {"endpoint": f"http://127.0.0.1:{upstreams['azure'].port}", "cluster": "azure",
                      "api_version": "2024-10-21", "auth": {"api_key": {"value": AZURE_KEY}}},
            "v1": {"endpoint": f"http://127.0.0.1:{upstreams['v1'].port}", "cluster": "v1",
                   "api": "v1", "auth": {"api_key": {"value": V1_KEY}}},
            "vllm": {"kind": "openai", "endpoint": f"http://127.0.0.1:{upstreams['vllm'].port}/v1",
                     "cluster": "vllm", "auth": {"bearer": {"value": "vllm-token"}}},
        },
        "models": {
            "gpt-4o": {"upstream": "azure", "deployment": "gpt4o-prod"},
            "gpt-4.1": {"upstream": "v1", "deployment": "gpt41-prod"},
            "whisper-v1": {"upstream": "v1", "deployment": "whisper-v1-prod"},
            "secret-v1": {"upstream": "v1", "deployment": "dep-secret"},
            "whisper-vllm": {"upstream": "vllm", "deployment": "openai/whisper-large-v3"},
        },
        "callers": [
            {"name": "team", "key_sha256": sha256_hex(KEY),
             "models": ["gpt-4o", "gpt-4.1", "whisper-v1", "whisper-vllm"]},
            {"name": "ops", "key_sha256": sha256_hex(OPS_KEY), "models": ["*"]},
        ],
    }


@pytest.fixture(scope="module")
def gateway(upstreams):
    envoy = Envoy(bootstrap([wasm_filter(gateway_config(upstreams))],
                            [cluster(n, s.port) for n, s in upstreams.items()]))
    envoy.start()
    yield envoy
    envoy.cleanup()


def nothing_received(upstreams):
    return all(not server.received for server in upstreams.values())


# ------------------------------------------------------------ multipart forms

BOUNDARY = "hardening-boundary-7d1f"


def form(*parts, boundary=BOUNDARY):
    body = b""
    for headers, content in parts:
        body += b"--" + boundary.encode() + b"\r\n" + headers.encode() + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + boundary.encode() + b"--\r\n"


FILE = ('Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav',
        b"RIFF\x00\x01\x02")


def post_form(gateway, body, content_type=f"multipart/form-data; boundary={BOUNDARY}",
              path="/v1/audio/transcriptions", key=KEY):
    return httpx.post(gateway.url + path, content=body, timeout=30,
                      headers={"authorization": f"Bearer {key}", "content-type": content_type})


@pytest.mark.parametrize("headers", [
    # python-multipart keeps the last Content-Disposition header and the last name.
    'Content-Disposition: form-data; name="language"\r\nContent-Disposition: form-data; name="model"',
    'Content-Disposition: form-data; name="language"; name="model"',
    'Content-Disposition: form-data; name*=UTF-8\'\'model',
    'Content-Disposition: form-data; name=<model>',
    # python-multipart and Werkzeug ignore the disposition type.
    'Content-Disposition: attachment; name="model"',
    'Content-Disposition: form-data; name="Model"',
])
def test_form_parts_an_upstream_could_read_as_the_model_are_refused(gateway, upstreams, headers):
    body = form(('Content-Disposition: form-data; name="model"', b"whisper-v1"),
                (headers, b"dep-secret"), FILE)
    assert_openai_error(post_form(gateway, body), 400, "invalid_multipart")
    assert nothing_received(upstreams)


def test_a_content_type_with_two_boundaries_is_refused(gateway, upstreams):
    # Werkzeug reads the last boundary parameter, the filter would read the first.
    body = form(('Content-Disposition: form-data; name="model"', b"whisper-v1"), FILE)
    content_type = f"multipart/form-data; boundary={BOUNDARY}; boundary=other"
    assert_openai_error(post_form(gateway, body, content_type), 400, "invalid_multipart")
    assert nothing_received(upstreams)


def test_a_part_hidden_behind_a_bare_lf_delimiter_is_refused(gateway, upstreams):
    # Werkzeug accepts LF line breaks around a boundary; the file would hide a part.
    hidden = (b"x\n--" + BOUNDARY.encode() + b'\nContent-Disposition: form-data; name="model"\n\n'
              b"dep-secret\n")
    body = form(('Content-Disposition: form-data; name="model"', b"whisper-v1"),
                ('Content-Disposition: form-data; name="file"; filename="a.wav"', hidden))
    assert_openai_error(post_form(gateway, body), 400, "invalid_multipart")
    assert nothing_received(upstreams)


def test_a_plain_form_still_reaches_the_v1_upstream_rewritten(gateway, upstreams):
    body = form(FILE, ('Content-Disposition: form-data; name="model"', b"whisper-v1"))
    upstreams["v1"].responder = lambda r: Reply(200, {"content-type": "application/json"},
                                                b'{"text":"hi"}')
    response = post_form(gateway, body)
    assert response.status_code == 200, response.text
    sent = upstreams["v1"].only()
    assert sent.path == "/openai/v1/audio/transcriptions"
    assert b'name="model"\r\n\r\nwhisper-v1-prod\r\n' in sent.body
    assert sent.body.startswith(form(FILE)[:-len(BOUNDARY) - 6])


def test_a_forbidden_model_is_refused_before_the_upload_ends(gateway, upstreams):
    """The form names a model the caller may not use; the answer comes while
    the client is still sending the file, and nothing goes upstream."""
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {LIMIT - 10}\r\n\r\n").encode()
    start = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nsecret-v1\r\n'
             f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             f'\r\n').encode() + b"\x00" * 4096
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head + start)  # the rest of the upload never comes
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 404"), answer
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "model_not_found"
    assert nothing_received(upstreams)


def test_forms_of_many_tiny_parts_are_refused_and_the_worker_keeps_serving(upstreams):
    """The review's 650,000-part form (7.8 MB) cost a worker 2.7 s. Parts
    without a disposition are refused at the first; named ones at the
    1001st, having read little more than those."""
    config = {**gateway_config(upstreams), "max_request_body_bytes": 16 * 1024 * 1024}
    big = Envoy(bootstrap([wasm_filter(config)],
                          [cluster(n, s.port) for n, s in upstreams.items()]), concurrency=1)
    big.start()
    try:
        review = b"--b\r\n\r\nxxx\r\n" * 650_000 + b"--b--\r\n"
        assert 7_500_000 < len(review) < 8_000_000
        named = b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n" * 100_000 + b"--b--\r\n"
        for body, message in [(review, "no Content-Disposition"), (named, "more than 1000 parts")]:
            response = post_form(big, body, content_type="multipart/form-data; boundary=b")
            error = assert_openai_error(response, 400, "invalid_multipart")
            assert message in error["message"]
            # The single worker answers the next request at once.
            models = httpx.get(big.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"},
                               timeout=10)
            assert models.status_code == 200
    finally:
        big.cleanup()
    assert nothing_received(upstreams)


# ------------------------------------------------------------ stored responses

def test_stored_response_queries_forward_only_known_parameters(gateway, upstreams):
    upstreams["azure"].responder = lambda r: Reply(200, {"content-type": "application/json"},
                                                   b'{"object":"list","data":[]}')
    query = (f"api-key={KEY}&Api-Version=2020-01-01&API-VERSION=x&api%2Dversion=y&"
             f"limit=2&include%5B%5D=file_search_call.results&order=desc&subscription-key={KEY}")
    response = httpx.get(gateway.url + f"/v1/responses/resp_abc/input_items?{query}",
                         headers={"api-key": KEY}, timeout=30)
    assert response.status_code == 200, response.text
    sent = upstreams["azure"].only()
    assert sent.path == ("/openai/responses/resp_abc/input_items?limit=2&"
                         "include%5B%5D=file_search_call.results&order=desc&"
                         "api-version=2025-04-01-preview")
    assert KEY not in json.dumps(sent.headers)
    assert sent.all("api-key") == [AZURE_KEY]
    # No query string, and no caller key, in the filter's log.
    assert gateway.wait_for_log("/openai/responses/resp_abc/input_items")
    log = gateway.log()
    assert "limit=2" not in log and KEY not in log


def test_stored_response_query_values_are_checked(gateway, upstreams):
    for query in ["limit=1&limit=2", "after=a%26api-version%3D1"]:
        response = httpx.get(gateway.url + f"/v1/responses/resp_abc?{query}",
                             headers={"api-key": KEY}, timeout=30)
        assert_openai_error(response, 400, "invalid_value")
    assert nothing_received(upstreams)


# ------------------------------------------------------------ limits

def test_azure_style_chunked_body_over_the_limit_never_completes_upstream(gateway, upstreams):
    """Forwarded on its headers (deployments API), the body streams through
    unread; past the limit the filter answers 413 and the upstream request
    is reset, never completed."""
    chunk = b" " * 65536

    def body():
        yield b'{"messages":[],"pad":"'
        for _ in range(LIMIT // len(chunk) + 8):
            yield chunk
        yield b'"}'

    response = httpx.post(gateway.url + "/openai/deployments/gpt-4o/chat/completions"
                          "?api-version=2024-10-21", content=body(),
                          headers={"api-key": KEY, "content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 413, "request_too_large")
    time.sleep(0.3)
    assert upstreams["azure"].received == []


def test_azure_style_chunked_body_within_the_limit_is_forwarded(gateway, upstreams):
    def body():
        yield b'{"messages":[],'
        yield b'"pad":"' + b" " * 200_000 + b'"}'

    response = httpx.post(gateway.url + "/openai/deployments/gpt-4o/chat/completions"
                          "?api-version=2024-10-21", content=body(),
                          headers={"api-key": KEY, "content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    assert len(upstreams["azure"].only().body) > 200_000


# ------------------------------------------------------------ Azure errors

DEPLOYMENT_NOT_FOUND = json.dumps({"error": {
    "code": "DeploymentNotFound",
    "message": "The API deployment for this resource does not exist (gpt4o-prod)."}}).encode()


def test_a_gzip_encoded_deployment_not_found_is_translated(gateway, upstreams):
    upstreams["azure"].responder = lambda r: Reply(
        404, {"content-type": "application/json", "content-encoding": "gzip"},
        gzip.compress(DEPLOYMENT_NOT_FOUND))
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                          headers={"authorization": f"Bearer {KEY}",
                                   "accept-encoding": "gzip, deflate, br"}, timeout=30)
    error = assert_openai_error(response, 404, "model_not_found")
    assert "gpt-4o" in error["message"] and "gpt4o-prod" not in response.text
    assert "content-encoding" not in response.headers
    # The filter asked for an uncompressed answer; the caller's preference stayed here.
    assert upstreams["azure"].only().all("accept-encoding") == ["identity"]


def test_an_error_in_an_unreadable_encoding_is_replaced(gateway, upstreams):
    upstreams["azure"].responder = lambda r: Reply(
        404, {"content-type": "application/json", "content-encoding": "br"}, b"\x1b\x2c\x00\x00 gpt4o-prod")
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                          headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert_openai_error(response, 404, "upstream_error")
    assert "gpt4o-prod" not in response.text


def test_successful_answers_pass_unchanged(gateway, upstreams):
    reply = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": []}).encode()
    upstreams["azure"].responder = lambda r: Reply(200, {"content-type": "application/json"}, reply)
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                          headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 200 and response.content == reply
    assert response.headers["content-length"] == str(len(reply))


# ------------------------------------------------------------ "model": null

def test_azure_style_callers_sending_a_null_model_reach_the_v1_upstream(gateway, upstreams):
    """LangChain's AzureChatOpenAI names the deployment in the path and sends
    "model": null in the body."""
    body = b'{"model": null, "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(gateway.url + "/openai/deployments/gpt-4.1/chat/completions"
                          "?api-version=2024-10-21", content=body,
                          headers={"api-key": KEY, "content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    sent = json.loads(upstreams["v1"].only().body)
    assert sent["model"] == "gpt41-prod"
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


def test_a_null_model_is_a_missing_model_for_openai_style_callers(gateway, upstreams):
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b'{"model": null}',
                          headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert_openai_error(response, 400, "missing_required_parameter")
    assert nothing_received(upstreams)


# ------------------------------------------------------------ missing flag

@wasm_only("allow_on_headers_stop_iteration is a Wasm filter setting")
def test_without_allow_on_headers_stop_iteration_requests_get_500_not_a_hang(upstreams):
    filter_entry = wasm_filter(gateway_config(upstreams))
    filter_entry["typed_config"]["config"]["allow_on_headers_stop_iteration"] = False
    envoy = Envoy(bootstrap([filter_entry], [cluster(n, s.port) for n, s in upstreams.items()]),
                  concurrency=1)
    envoy.start()
    try:
        for _ in range(2):
            started = time.monotonic()
            response = httpx.post(envoy.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                                  headers={"authorization": f"Bearer {KEY}"}, timeout=20)
            error = assert_openai_error(response, 500, "gateway_error")
            assert "allow_on_headers_stop_iteration" in error["message"]
            assert time.monotonic() - started < 15
        assert envoy.wait_for_log("set `allow_on_headers_stop_iteration: true`")
        assert envoy.log().count("does not deliver request bodies") == 1
        # What needs no body still works.
        models = httpx.get(envoy.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"},
                           timeout=10)
        assert models.status_code == 200
    finally:
        envoy.cleanup()
    assert nothing_received(upstreams)
