"""The manifests under deploy/: the Envoy configuration each one carries,
put where Istio or Envoy Gateway would put it (tests/integration/mesh.py),
loaded into a real Envoy 1.40 and sent requests through the filter to an
Azure stand-in over TLS with SNI and certificate checks."""

import json
import ssl
import subprocess
import threading
import time

import httpx
import pytest
import yaml
from harness import (ENVOY, METRIC_LABELS, ROOT, STATS_TAGS, WASM, Envoy, RecordingUpstream, Reply,
                     assert_openai_error, cel_filter, local_reply_config, scrape, sha256_hex)
from test_envoy_replies import assert_envoy_error, raw_exchange

import mesh

# The stats tags every manifest (and the dashboard) uses are the harness's,
# the ones every envoy/*.yaml carries: the metric names of the usage issue
# encode labels as `<name>_caller=.=<v>;.;model=.=<v>;.;...`.
LABELS = METRIC_LABELS

DEPLOY = ROOT / "deploy"
# deploy/istio/sidecar.yaml's second reply mapper: replies on the pod's other
# routes (and before routing) are left as Envoy makes them.
SIDECAR_GUARD = "!has(xds.route_name) || xds.route_name != 'azure-openai'"

TEAM_A_KEY = "replace-me-team-a-key"  # its SHA-256 is in the manifests
AZURE_HOSTS = ["acme-west.openai.azure.com", "acme-east.openai.azure.com"]


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    """An HTTPS stand-in for both Azure resources: a certificate for their
    names from a test CA, and a record of the SNI each connection sent."""
    d = tmp_path_factory.mktemp("tls")
    san = ",".join(f"DNS:{h}" for h in AZURE_HOSTS)
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=azure-openai-filter test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr",
        "-subj", "/CN=openai.azure.com")
    (d / "san.ext").write_text(f"subjectAltName={san}\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.crt", "-days", "2", "-extfile", "san.ext")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "leaf.crt", d / "leaf.key")
    snis = []
    lock = threading.Lock()

    def record(sock, name, ctx):
        with lock:
            snis.append(name)
    context.sni_callback = record
    upstream = RecordingUpstream("azure", ssl_context=context)
    upstream.snis = snis
    upstream.ca = d / "ca.crt"
    yield upstream
    upstream.stop()


def build(kind, tmp_path, passthrough_port=1):
    if kind == "istio-gateway":
        return mesh.istio_gateway(WASM, tmp_path)
    if kind == "istio-sidecar":
        return mesh.istio_sidecar(WASM, tmp_path, passthrough_port)
    return mesh.envoy_gateway(WASM)


KINDS = ["istio-gateway", "istio-sidecar", "envoy-gateway"]
HOSTS = {"istio-gateway": "azure-openai-gateway.azure-openai:8080",
         "istio-sidecar": "azure-openai",
         "envoy-gateway": "openai.example.com"}


def azure_clusters(bootstrap):
    clusters = [c for c in bootstrap["static_resources"]["clusters"] if c["name"].startswith("azure_")]
    assert sorted(c["name"] for c in clusters) == ["azure_east", "azure_west"]
    return clusters


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_passes_envoy_validate(kind, tmp_path):
    """As shipped (real Azure names, the system CA bundle), plus the
    bootstrap additions, through `envoy --mode validate`."""
    bootstrap, args, env = build(kind, tmp_path)
    for cluster in azure_clusters(bootstrap):
        tls = cluster["transport_socket"]["typed_config"]
        host = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
        assert tls["sni"] == host
        assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": host}}]
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                             *args], env={"PATH": "/usr/bin:/bin", **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def start(kind, tmp_path, azure, passthrough=None, without_cluster=None):
    """The manifest's Envoy, its Azure clusters aimed at the stand-in;
    `without_cluster` leaves one out (an operator who forgot it)."""
    bootstrap, args, env = build(kind, tmp_path, passthrough.port if passthrough else 1)
    clusters = bootstrap["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != without_cluster]
    for cluster in clusters:
        if not cluster["name"].startswith("azure_"):
            continue
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        address.update(address="127.0.0.1", port_value=azure.port)
        validation = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
        validation["trusted_ca"] = {"filename": str(azure.ca)}
    envoy = Envoy(bootstrap, env=env)
    envoy.args += args
    return envoy.start(), env


@pytest.fixture
def passthrough():
    upstream = RecordingUpstream("passthrough")
    yield upstream
    upstream.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_serves_through_the_filter(kind, tmp_path, azure, passthrough):
    envoy, env = start(kind, tmp_path, azure, passthrough)
    try:
        host = HOSTS[kind]
        key = {"authorization": f"Bearer {TEAM_A_KEY}", "host": host}
        azure.reset()
        azure.snis.clear()

        reply = httpx.post(envoy.url + "/v1/chat/completions", headers=key, timeout=10,
                           json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, (reply.headers, reply.text, azure.received, envoy.log()[-4000:])
        west = azure.only()
        assert west.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        # The key comes from the manifest's Secret, through the pod's environment.
        assert west.header("api-key") == env["AZURE_WEST_KEY"]
        assert west.header("authorization") is None
        assert west.header("x-azure-openai-cluster") is None
        assert west.header("host") == "acme-west.openai.azure.com"
        assert azure.snis[-1] == "acme-west.openai.azure.com"

        azure.reset()
        reply = httpx.post(envoy.url + "/v1/chat/completions", headers=key, timeout=10,
                           json={"model": "gpt-4o-mini", "messages": []})
        assert reply.status_code == 200, reply.text
        east = azure.only()
        assert east.path == "/openai/v1/chat/completions"
        assert json.loads(east.body)["model"] == "gpt4o-mini-prod"
        assert east.header("api-key") == env["AZURE_EAST_KEY"]
        assert azure.snis[-1] == "acme-east.openai.azure.com"

        # Rejections are the filter's own, and nothing is forwarded.
        azure.reset()
        reply = httpx.post(envoy.url + "/v1/chat/completions", headers={"host": host}, timeout=10,
                           json={"model": "gpt-4o"})
        assert_openai_error(reply, 401, "missing_api_key")
        reply = httpx.post(envoy.url + "/v1/embeddings", headers=key, timeout=10,
                           json={"model": "text-embedding-3-small", "input": "x"})
        assert_openai_error(reply, 404, "model_not_found")
        assert azure.received == []

        # A body far above Envoy's default 1 MiB connection buffer: the
        # route's request_body_buffer_limit lets the filter hold it.
        big = json.dumps({"model": "gpt-4o", "input": "x" * 3_000_000})
        reply = httpx.post(envoy.url + "/v1/embeddings", content=big, timeout=30,
                           headers={**key, "content-type": "application/json"})
        assert reply.status_code == 200, reply.text[:300]
        assert len(azure.only().body) == len(big)
        # Over HTTP/2 (prior knowledge) the route's limit holds too, whatever
        # stream window the mesh gives the listener (Envoy Gateway: 64 KiB;
        # Istio: Envoy's default), with a body above the 16 MiB at which a
        # default window would give Envoy's 413.
        azure.reset()
        big = json.dumps({"model": "gpt-4o", "input": "x" * 17_000_000})
        with httpx.Client(http1=False, http2=True, timeout=60) as h2:
            reply = h2.post(envoy.url + "/v1/embeddings", content=big,
                            headers={**key, "content-type": "application/json"})
        assert reply.http_version == "HTTP/2"
        assert reply.status_code == 200, reply.text[:300]
        assert len(azure.only().body) == len(big)

        if kind == "istio-gateway":
            # Other hosts on the gateway never meet the filter (which would
            # refuse the key with a 401): Istio's 404, in the gateway's JSON.
            azure.reset()
            reply = httpx.post(envoy.url + "/v1/chat/completions", timeout=10,
                               headers={"host": "other.example.com", "authorization": "Bearer x"},
                               json={"model": "gpt-4o"})
            error = assert_openai_error(reply, 404, "invalid_request")
            assert "(direct_response)" in error["message"], error
            assert azure.received == []
        if kind == "istio-sidecar":
            # The pod's other outbound HTTP passes untouched, its credentials too.
            reply = httpx.post(envoy.url + "/anything", timeout=10,
                               headers={"host": "api.example.com", "authorization": "Bearer mine"},
                               content=b"{}")
            assert reply.status_code == 200
            assert passthrough.only().header("authorization") == "Bearer mine"
            assert passthrough.only().path == "/anything"
    finally:
        envoy.cleanup()


def chat(envoy, kind, model, key=TEAM_A_KEY, **headers):
    return httpx.post(envoy.url + "/v1/chat/completions", timeout=10,
                      headers={"authorization": f"Bearer {key}", "host": HOSTS[kind], **headers},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_answers_envoys_own_replies_in_openai_json(kind, tmp_path, azure, passthrough):
    """The manifest's local_reply_config, merged into the connection manager
    the mesh generates: an operator who forgot a cluster, an upstream that
    hangs up, headers too large. In the sidecar, the pod's other traffic
    keeps Envoy's own replies."""
    envoy, _ = start(kind, tmp_path, azure, passthrough, without_cluster="azure_east")
    try:
        azure.reset()
        error = assert_envoy_error(chat(envoy, kind, "gpt-4o-mini"), 503, "cluster_not_found")
        assert "`azure_east`" in error["message"], error
        assert azure.received == []

        azure.responder = lambda request: Reply(raw=b"")
        error = assert_envoy_error(chat(envoy, kind, "gpt-4o"), 503, "upstream_unavailable")
        assert "connection_termination" in error["message"], error
        assert len(azure.received) == 1  # it did reach Azure, which hung up
        azure.reset()

        # The filter's own replies are not rewritten.
        error = assert_openai_error(chat(envoy, kind, "gpt-4o", key="sk-wrong"), 401,
                                    "invalid_api_key")
        assert error["type"] == "invalid_request_error"

        big = (f"GET /v1/models HTTP/1.1\r\nhost: {HOSTS[kind]}\r\nx-big: ".encode()
               + b"a" * 100_000 + b"\r\n\r\n")
        reply = raw_exchange(envoy.port, big)
        if kind == "istio-sidecar":
            # Before routing Envoy cannot tell whom it answers: left as it is.
            assert reply.status_code == 431
            assert reply.headers.get("content-type") != "application/json"
            passthrough.responder = lambda request: Reply(raw=b"")
            reply = httpx.post(envoy.url + "/anything", timeout=10, content=b"{}",
                               headers={"host": "api.example.com"})
            assert reply.status_code == 503
            assert reply.headers.get("content-type") != "application/json"
            assert reply.content.startswith(b"upstream connect error"), reply.content
            assert len(passthrough.received) == 1
        else:
            assert_envoy_error(reply, 431, "request_headers_too_large")
        if kind == "envoy-gateway":
            # Envoy Gateway refuses header names with underscores by default.
            error = assert_envoy_error(chat(envoy, kind, "gpt-4o", x_trace="1"), 400,
                                       "malformed_request")
            assert "(http1.unexpected_underscore)" in error["message"], error
            assert azure.received == []
    finally:
        envoy.cleanup()


def manifest_reply_config(kind):
    """The local_reply_config each manifest merges into the connection manager."""
    if kind == "envoy-gateway":
        policy = mesh.one(mesh.documents(DEPLOY / "envoy-gateway" / "azure-openai.yaml"),
                          "EnvoyPatchPolicy")
        found = [p["operation"]["value"] for p in policy["spec"]["jsonPatches"]
                 if p["operation"].get("path", "").endswith("local_reply_config")]
    else:
        name = "ingress-gateway.yaml" if kind == "istio-gateway" else "sidecar.yaml"
        envoy_filter = mesh.one(mesh.documents(DEPLOY / "istio" / name), "EnvoyFilter")
        found = [p["patch"]["value"]["typed_config"]["local_reply_config"]
                 for p in envoy_filter["spec"]["configPatches"]
                 if p["applyTo"] == "NETWORK_FILTER"]
    assert len(found) == 1, kind
    return found[0]


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_reply_mappers_are_the_examples(kind):
    """The same mappers as harness ENVOY_REPLIES and every envoy/*.yaml; the
    sidecar's second mapper keeps them to the filter's routes."""
    expected = local_reply_config("x-azure-openai-cluster")["mappers"]
    mappers = manifest_reply_config(kind)["mappers"]
    if kind == "istio-sidecar":
        assert mappers[1] == {"filter": cel_filter(SIDECAR_GUARD)}
        mappers = mappers[:1] + mappers[2:]
    assert mappers == expected


@pytest.mark.parametrize("kind", KINDS)
def test_limits_and_histograms_reach_prometheus_with_their_labels(kind, tmp_path, azure):
    """The manifests' team-a has limits: an answer that spends its tokens
    gets its next request a 429, and /stats/prometheus then shows the
    limited counter and the latency buckets with exactly their labels."""
    envoy, _ = start(kind, tmp_path, azure)
    try:
        usage = {"prompt_tokens": 2_000_000, "completion_tokens": 2_000_000,
                 "total_tokens": 4_000_000}  # ten times the minute's budget: also the next's
        body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                           "model": "gpt-4o-2024-08-06", "usage": usage,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "hi"}}]})
        azure.reset()
        azure.responder = lambda request: Reply(200, {"content-type": "application/json"},
                                                body.encode())
        first = chat(envoy, kind, "gpt-4o")
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-tokens"] == "400000"
        # Tokens are charged on the workers' tick: within a second.
        for _ in range(50):
            reply = chat(envoy, kind, "gpt-4o")
            if reply.status_code != 200:
                break
            time.sleep(0.1)
        error = assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert error["type"] == "tokens", error
        served = len(azure.received)

        limited = ("azure_openai_limited_total",
                   frozenset({("caller", "team-a"), ("limit", "tokens"), ("scope", "local")}))
        bucket = ("azure_openai_request_duration_ms_bucket",
                  frozenset({("caller", "team-a"), ("model", "gpt-4o"),
                             ("deployment", "gpt4o-prod"), ("le", "+Inf")}))
        tokens = ("azure_openai_tokens_total",
                  frozenset({("caller", "team-a"), ("model", "gpt-4o"), ("upstream", "west"),
                             ("deployment", "gpt4o-prod"), ("type", "input")}))
        for _ in range(50):
            series = scrape(envoy)
            if all(name in series for name in (limited, bucket, tokens)):
                break
            time.sleep(0.1)
        assert series.get(limited) == 1, sorted(series)
        assert series.get(bucket) == served, sorted(series)
        assert series.get(tokens) == 2_000_000 * served, sorted(series)
        buckets = {dict(labels)["le"] for name, labels in series
                   if name == "azure_openai_time_to_first_byte_ms_bucket"}
        assert {"50", "300000", "+Inf"} <= buckets, buckets
    finally:
        envoy.cleanup()


@pytest.mark.parametrize("kind", KINDS)
def test_stats_tags_reach_the_bootstrap(kind, tmp_path, azure):
    """The manifests' stats tags, merged as Istio (--config-yaml from the
    bootstrapOverride ConfigMap) and Envoy Gateway (EnvoyProxy bootstrap
    Merge) merge them, are in the running Envoy's bootstrap."""
    envoy, _ = start(kind, tmp_path, azure)
    try:
        dump = httpx.get(envoy.admin + "/config_dump?mask=bootstrap", timeout=5).json()
        stats = dump["configs"][0]["bootstrap"]["stats_config"]
        tags = [t for t in stats["stats_tags"] if t["tag_name"] in LABELS]
        assert tags == STATS_TAGS
        if kind.startswith("istio"):
            patterns = stats["stats_matcher"]["inclusion_list"]["patterns"]
            assert {"prefix": "wasmcustom.azure_openai"} in patterns
    finally:
        envoy.cleanup()


def test_every_manifest_carries_the_same_stats_tags():
    texts = {p: p.read_text() for p in (ROOT / "deploy").rglob("*.yaml")}
    carriers = 0
    for path, text in texts.items():
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            if doc["kind"] == "ConfigMap" and "custom_bootstrap.json" in doc.get("data", {}):
                tags = json.loads(doc["data"]["custom_bootstrap.json"])["stats_config"]["stats_tags"]
            elif doc["kind"] == "EnvoyProxy":
                tags = yaml.safe_load(doc["spec"]["bootstrap"]["value"])["stats_config"]["stats_tags"]
            else:
                continue
            assert tags == STATS_TAGS, path
            carriers += 1
    assert carriers == 3


def test_the_documented_caller_key_matches_the_manifests():
    for name in ["istio/ingress-gateway.yaml", "istio/sidecar.yaml", "envoy-gateway/azure-openai.yaml"]:
        assert sha256_hex(TEAM_A_KEY) in (ROOT / "deploy" / name).read_text(), name
