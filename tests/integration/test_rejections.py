"""Every rejection: answered by the filter with OpenAI error JSON, and nothing
reaches an upstream."""

import json

import httpx
import pytest
from conftest import BODY_LIMIT, TEAM_A_KEY
from harness import assert_openai_error

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture(autouse=True)
def nothing_forwarded(west, east):
    yield
    assert west.received == [] and east.received == [], "a rejected request was forwarded"


def send(gateway, method="POST", path="/v1/chat/completions", body=CHAT, headers=None, key=TEAM_A_KEY):
    all_headers = [("content-type", "application/json")]
    if key is not None:
        all_headers.append(("authorization", f"Bearer {key}"))
    all_headers += list((headers or {}).items())
    content = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    return httpx.request(method, gateway.url + path, content=content, headers=all_headers, timeout=30)


def test_missing_key(gateway):
    error = assert_openai_error(send(gateway, key=None), 401, "missing_api_key")
    assert error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer sk-wrong"},
    {"api-key": "sk-wrong"},
    {"authorization": "Bearer " + "0" * 64},
])
def test_wrong_key(gateway, headers):
    error = assert_openai_error(send(gateway, key=None, headers=headers), 401, "invalid_api_key")
    assert "sk-wrong" not in error["message"]


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "sk-team-a-0123456789"])
def test_malformed_authorization(gateway, value):
    assert_openai_error(send(gateway, key=None, headers={"authorization": value}), 401, "invalid_api_key")


def test_two_authorization_headers_are_ambiguous(gateway):
    # Envoy joins repeated Authorization headers with a comma; that is no key.
    headers = [("authorization", f"Bearer {TEAM_A_KEY}"), ("authorization", "Bearer other")]
    response = httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps(CHAT),
                          headers=headers, timeout=30)
    assert_openai_error(response, 401, "invalid_api_key")


def test_two_api_key_headers_are_ambiguous(gateway):
    headers = [("api-key", TEAM_A_KEY), ("api-key", "sk-other")]
    response = httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps(CHAT),
                          headers=headers, timeout=30)
    error = assert_openai_error(response, 401, "invalid_api_key")
    assert "more than once" in error["message"]


def test_non_utf8_key_is_refused_and_the_worker_survives(gateway, west):
    for _ in range(4):  # reach both workers
        response = httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps(CHAT),
                              headers=[(b"authorization", b"Bearer \xff\xfe\x80key")], timeout=30)
        assert_openai_error(response, 401, "invalid_api_key")
    assert "panicked" not in gateway.log()


def test_unknown_path(gateway):
    error = assert_openai_error(send(gateway, path="/v1/assistants"), 404, "unknown_url")
    assert error["message"] == "Invalid URL (POST /v1/assistants)."
    assert_openai_error(send(gateway, path="/openai/files"), 404, "unknown_url")


def test_unknown_path_without_key_is_still_404(gateway):
    assert_openai_error(send(gateway, path="/v2/chat/completions", key=None), 404, "unknown_url")


def test_wrong_method(gateway):
    response = send(gateway, method="GET", body=None)
    error = assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert "use POST" in error["message"]


def test_unknown_model(gateway):
    error = assert_openai_error(send(gateway, body={**CHAT, "model": "gpt-5"}), 404, "model_not_found")
    assert error["param"] == "model"
    assert error["message"] == "The model `gpt-5` does not exist or you do not have access to it."


def test_model_outside_allowlist_looks_like_unknown(gateway):
    forbidden = assert_openai_error(send(gateway, body={**CHAT, "model": "text-embedding-3-small"}),
                                    404, "model_not_found")
    unknown = assert_openai_error(send(gateway, body={**CHAT, "model": "text-embedding-3-large"}),
                                  404, "model_not_found")
    assert forbidden["message"].replace("small", "X") == unknown["message"].replace("large", "X")


def test_deployment_name_is_not_an_alias(gateway):
    assert_openai_error(send(gateway, body={**CHAT, "model": "gpt4o-prod"}), 404, "model_not_found")


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b'{"model": "gpt-4o",}', "invalid_json"),
    (b'{"model":"gpt-4o"} trailing', "invalid_json"),
    (b"[]", "invalid_json"),
    (b'"gpt-4o"', "invalid_json"),
    (b'{"messages": []}', "missing_required_parameter"),
    (b'{"model": 4}', "invalid_type"),
    (b'{"model": null}', "missing_required_parameter"),
    (b'{"model": ["gpt-4o"]}', "invalid_type"),
    (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', "invalid_json"),
    (b'{"model": "gpt-4o", "mod\\u0065l": "gpt-4o-mini"}', "invalid_json"),
    # Go's encoding/json would read these as the model (case-insensitive keys).
    (b'{"Model": "gpt-4o"}', "invalid_json"),
    (b'{"model": "gpt-4o", "MODEL": "gpt-4o-mini"}', "invalid_json"),
    (b'{"model": "gpt-4o", "\\u004dodel": "gpt-4o-mini"}', "invalid_json"),
    # JSON is UTF-8: a lenient reader may take what a strict one refuses.
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     "invalid_json"),
    (b'{"model": "gpt-4o", "user": "\xed\xa0\x80"}', "invalid_json"),
])
def test_bad_bodies_are_400(gateway, body, code):
    error = assert_openai_error(send(gateway, body=body), 400, code)
    assert error["type"] == "invalid_request_error"


def test_request_without_body(gateway):
    assert_openai_error(send(gateway, body=None), 400, "invalid_json")
    assert_openai_error(send(gateway, body=b""), 400, "invalid_json")


def test_declared_body_over_the_limit_is_refused_before_reading(gateway):
    body = json.dumps({**CHAT, "pad": "x" * BODY_LIMIT}).encode()
    error = assert_openai_error(send(gateway, body=body), 413, "request_too_large")
    assert str(BODY_LIMIT) in error["message"]


def test_chunked_body_over_the_limit_is_refused(gateway):
    chunk = b" " * 65536

    def body():
        yield b'{"model":"gpt-4o","pad":"'
        for _ in range(BODY_LIMIT // len(chunk) + 4):
            yield chunk
        yield b'"}'

    response = httpx.post(gateway.url + "/v1/chat/completions", content=body(),
                          headers={"authorization": f"Bearer {TEAM_A_KEY}"}, timeout=30)
    assert_openai_error(response, 413, "request_too_large")
