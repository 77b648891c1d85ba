"""Extra upstream headers (Azure API Management's subscription key, a
corporate proxy's header) and callers that bring their own Azure key,
through a real Envoy with recording upstreams."""

import httpx
import pytest
from harness import (FILTER_LOG_COMPONENT, Envoy, RecordingUpstream, assert_openai_error, bootstrap, cluster,
                     sha256_hex, wasm_filter)

TENANT_KEY = "sk-byok-tenant-0001"
OTHER_KEY = "sk-byok-other-0002"
TENANT_AZURE_KEY = "tenant-own-azure-key-5b1c"
APIM_KEY = "apim-subscription-from-env-77"
PROXY_TOKEN = "corp-proxy-token-42"
GATEWAY_AZURE_KEY = "gateway-azure-key-apim"


@pytest.fixture(scope="module")
def upstreams():
    servers = {name: RecordingUpstream(name) for name in ("apim", "plain")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh(upstreams):
    for server in upstreams.values():
        server.reset()
    yield


@pytest.fixture(scope="module")
def gateway(upstreams):
    config = {
        "upstreams": {
            "apim": {"endpoint": f"http://127.0.0.1:{upstreams['apim'].port}", "cluster": "apim",
                     "auth": {"api_key": {"value": GATEWAY_AZURE_KEY}},
                     "headers": {"Ocp-Apim-Subscription-Key": {"env": "APIM_KEY"},
                                 "X-Corp-Proxy": {"value": PROXY_TOKEN}},
                     "caller_credentials": {"callers": ["tenant"]}},
            "plain": {"endpoint": f"http://127.0.0.1:{upstreams['plain'].port}",
                      "cluster": "plain", "auth": {"api_key": {"value": "plain-key"}}},
        },
        "models": {"gpt-4o": {"upstream": "apim", "deployment": "gpt4o"},
                   "mini": {"upstream": "plain", "deployment": "mini"}},
        "callers": [{"name": "tenant", "key_sha256": sha256_hex(TENANT_KEY), "models": ["*"]},
                    {"name": "other", "key_sha256": sha256_hex(OTHER_KEY), "models": ["*"]}],
    }
    envoy = Envoy(bootstrap([wasm_filter(config, env_keys=["APIM_KEY"])],
                            [cluster(n, s.port) for n, s in upstreams.items()]),
                  env={"APIM_KEY": APIM_KEY}, log_level="trace", component_log_level=None)
    envoy.start()
    yield envoy
    envoy.cleanup()


def chat(gateway, key, model="gpt-4o", **headers):
    return httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                      headers={"authorization": f"Bearer {key}", **headers},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_extra_headers_arrive_on_every_request_secrets_from_env_included(gateway, upstreams):
    response = chat(gateway, OTHER_KEY, **{"ocp-apim-subscription-key": "caller-chosen"})
    assert response.status_code == 200, response.text
    received = upstreams["apim"].only()
    assert received.all("ocp-apim-subscription-key") == [APIM_KEY]
    assert received.all("x-corp-proxy") == [PROXY_TOKEN]
    assert received.all("api-key") == [GATEWAY_AZURE_KEY]
    # Not on another upstream's requests.
    assert chat(gateway, OTHER_KEY, model="mini").status_code == 200
    plain = upstreams["plain"].only()
    assert plain.header("ocp-apim-subscription-key") is None
    assert plain.header("x-corp-proxy") is None


def test_a_callers_own_key_replaces_the_configured_one_where_allowed(gateway, upstreams):
    response = chat(gateway, TENANT_KEY, **{"x-upstream-api-key": TENANT_AZURE_KEY})
    assert response.status_code == 200, response.text
    received = upstreams["apim"].only()
    assert received.all("api-key") == [TENANT_AZURE_KEY]
    assert received.header("x-upstream-api-key") is None
    assert received.header("authorization") is None
    assert [name for name, value in received.headers if TENANT_AZURE_KEY in value] == ["api-key"]
    assert received.all("ocp-apim-subscription-key") == [APIM_KEY]


@pytest.mark.parametrize("key, model, header, code", [
    (OTHER_KEY, "gpt-4o", "x-upstream-api-key", "caller_credentials_not_allowed"),
    (TENANT_KEY, "mini", "x-upstream-api-key", "caller_credentials_not_allowed"),
    (TENANT_KEY, "gpt-4o", "X-Upstream-Api-Key", None),
])
def test_a_callers_own_key_is_refused_where_it_is_not_allowed(gateway, upstreams, key, model,
                                                               header, code):
    response = chat(gateway, key, model=model, **{header: TENANT_AZURE_KEY})
    if code is None:  # header names ignore case: allowed, and taken
        assert response.status_code == 200
        assert upstreams["apim"].only().all("api-key") == [TENANT_AZURE_KEY]
        return
    assert_openai_error(response, 400, code)
    assert TENANT_AZURE_KEY not in response.text
    assert "x-upstream-api-key" in response.json()["error"]["message"]
    assert upstreams["apim"].received == [] and upstreams["plain"].received == []


def test_a_repeated_or_malformed_own_key_is_refused(gateway, upstreams):
    for value in ([("x-upstream-api-key", "a"), ("x-upstream-api-key", "b")],
                  [("x-upstream-api-key", "two words")]):
        response = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                              headers=[("authorization", f"Bearer {TENANT_KEY}"), *value],
                              json={"model": "gpt-4o", "messages": []})
        assert_openai_error(response, 400, "invalid_upstream_api_key")
    assert upstreams["apim"].received == []


def test_nothing_of_the_keys_appears_in_the_filters_logs_at_trace_level(gateway, upstreams):
    chat(gateway, TENANT_KEY, **{"x-upstream-api-key": TENANT_AZURE_KEY})
    chat(gateway, OTHER_KEY, **{"x-upstream-api-key": TENANT_AZURE_KEY})
    assert gateway.wait_for_log("(with the caller's own key)")
    lines = [line for line in gateway.log().splitlines()
             if f"][{FILTER_LOG_COMPONENT}]" in line]
    assert lines, "the filter logged nothing at trace level"
    for secret in (TENANT_AZURE_KEY, APIM_KEY, PROXY_TOKEN, GATEWAY_AZURE_KEY, TENANT_KEY):
        assert not [line for line in lines if secret in line], secret
