"""Usage you can see: tokens counted from every answer (streams included,
whether or not the caller asked for their usage), Prometheus metrics with
labels from the configuration only, through a real Envoy with recording
upstreams that answer like Azure."""

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from harness import (Envoy, RecordingUpstream, Reply, bootstrap, cluster, scrape, sha256_hex,
                     wasm_filter)

TEAM_KEY = "sk-usage-team-0001"
OPS_KEY = "sk-usage-ops-0002"


def usage_of(body):
    """Token counts the stand-in reports, derived from the request so tests
    can predict them."""
    text = json.dumps(body.get("messages") or body.get("input") or "")
    return {"prompt_tokens": len(text) % 97 + 3, "completion_tokens": 7, "total_tokens": 0}


def azure_like(request):
    """Answers like Azure: JSON with usage, or SSE; with include_usage every
    chunk carries "usage": null and a last usage-only chunk follows."""
    path = request.path.split("?")[0]
    body = json.loads(request.body or b"{}")
    usage = usage_of(body)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    headers = {"x-ratelimit-remaining-requests": "41", "x-ratelimit-remaining-tokens": "9000"}
    if path.endswith("/embeddings"):
        return Reply(200, {**headers, "content-type": "application/json"}, json.dumps({
            "object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
            "model": "m", "usage": {"prompt_tokens": usage["prompt_tokens"],
                                    "total_tokens": usage["prompt_tokens"]}}).encode())
    if path.endswith("/responses"):
        details = {"input_tokens": usage["prompt_tokens"], "output_tokens": 7,
                   "input_tokens_details": {"cached_tokens": 2},
                   "output_tokens_details": {"reasoning_tokens": 3},
                   "total_tokens": usage["total_tokens"]}
        response = {"id": "resp_1", "object": "response", "status": "completed",
                    "output": [{"type": "message", "id": "m1", "status": "completed",
                                "role": "assistant", "content": [
                                    {"type": "output_text", "text": "hi", "annotations": []}]}],
                    "usage": details}
        if body.get("stream"):
            events = [
                {"type": "response.created", "sequence_number": 0,
                 "response": {**response, "status": "in_progress", "usage": None, "output": []}},
                {"type": "response.output_text.delta", "sequence_number": 1, "delta": "hi",
                 "item_id": "m1", "output_index": 0, "content_index": 0},
                {"type": "response.completed", "sequence_number": 2, "response": response},
            ]
            chunks = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
            return Reply(200, {**headers, "content-type": "text/event-stream"}, chunks)
        return Reply(200, {**headers, "content-type": "application/json"},
                     json.dumps(response).encode())
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    if body.get("stream"):
        null = {"usage": None} if include_usage else {}
        chunks = [{"id": "", "object": "", "created": 0, "model": "", "choices": [],
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                   **null}]
        for i, word in enumerate(["Hel", "lo"]):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                           "model": "gpt-4o-2024-08-06", "choices": [
                               {"index": 0, "delta": delta, "finish_reason": None}], **null})
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                       "model": "gpt-4o-2024-08-06",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **null})
        if include_usage:
            chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                           "model": "gpt-4o-2024-08-06", "choices": [], "usage": usage})
        events = [f"data: {json.dumps(c, separators=(',', ':'))}\n\n".encode() for c in chunks]
        events.append(b"data: [DONE]\n\n")
        return Reply(200, {**headers, "content-type": "text/event-stream"}, events)
    return Reply(200, {**headers, "content-type": "application/json"}, json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
        "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant",
                                                               "content": "hi"}}],
        "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 1},
                  "completion_tokens_details": {"reasoning_tokens": 2}}}).encode())


@pytest.fixture(scope="module")
def upstreams():
    servers = {name: RecordingUpstream(name) for name in ("azure", "v1", "old")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh(upstreams):
    for server in upstreams.values():
        server.reset()
        server.responder = azure_like
    yield


@pytest.fixture(scope="module")
def gateway(upstreams):
    config = {
        "upstreams": {
            "azure": {"endpoint": f"http://127.0.0.1:{upstreams['azure'].port}", "cluster": "azure",
                      "api_version": "2024-10-21", "auth": {"api_key": {"value": "k1"}}},
            "v1": {"endpoint": f"http://127.0.0.1:{upstreams['v1'].port}", "cluster": "v1",
                   "api": "v1", "auth": {"api_key": {"value": "k2"}}},
            "old": {"endpoint": f"http://127.0.0.1:{upstreams['old'].port}", "cluster": "old",
                    "api_version": "2024-06-01", "auth": {"api_key": {"value": "k3"}}},
        },
        "models": {
            "gpt-4o": {"upstream": "azure", "deployment": "gpt4o-prod"},
            "gpt-4.1": {"upstream": "v1", "deployment": "gpt41-prod"},
            "embed": {"upstream": "azure", "deployment": "embed-prod"},
            "gpt-35": {"upstream": "old", "deployment": "gpt35-old"},
        },
        "callers": [
            {"name": "team", "key_sha256": sha256_hex(TEAM_KEY), "models": ["gpt-4o", "gpt-4.1"]},
            {"name": "ops", "key_sha256": sha256_hex(OPS_KEY), "models": ["*"]},
        ],
        "access_log": True,
    }
    log_dir = tempfile.mkdtemp(prefix="access-log-")
    envoy = Envoy(bootstrap([wasm_filter(config)],
                            [cluster(n, s.port) for n, s in upstreams.items()],
                            access_log_path=f"{log_dir}/access.log"))
    envoy.access_log = Path(log_dir) / "access.log"
    envoy.start()
    yield envoy
    envoy.cleanup()
    shutil.rmtree(log_dir, ignore_errors=True)


def series(gateway, name, **labels):
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scrape(gateway).items() if n == name and wanted <= set(ls))


def wait_for(gateway, name, value, **labels):
    """Metrics reach Envoy on the root's tick (once a second; later on a
    loaded machine)."""
    deadline = time.monotonic() + 15
    while True:
        got = series(gateway, name, **labels)
        if got >= value or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def tokens(gateway, caller, model, kind):
    return series(gateway, "azure_openai_tokens_total", caller=caller, model=model, type=kind)


def client(gateway, key=TEAM_KEY):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def test_json_answers_are_counted_by_caller_model_and_deployment(gateway, upstreams):
    before = {k: tokens(gateway, "team", "gpt-4o", k)
              for k in ("input", "output", "cached_input", "reasoning_output")}
    messages = [{"role": "user", "content": "count me"}]
    expected = usage_of({"messages": messages})
    for _ in range(3):
        client(gateway).chat.completions.create(model="gpt-4o", messages=messages)
    want = before["input"] + 3 * expected["prompt_tokens"]
    assert wait_for(gateway, "azure_openai_tokens_total", want, caller="team", model="gpt-4o",
                    type="input") == want
    assert tokens(gateway, "team", "gpt-4o", "output") == before["output"] + 21
    assert tokens(gateway, "team", "gpt-4o", "cached_input") == before["cached_input"] + 3
    assert tokens(gateway, "team", "gpt-4o", "reasoning_output") == before["reasoning_output"] + 6
    labels = {("caller", "team"), ("model", "gpt-4o"), ("upstream", "azure"),
              ("deployment", "gpt4o-prod"), ("type", "input")}
    assert any(n == "azure_openai_tokens_total" and set(ls) == labels
               for n, ls in scrape(gateway))


def test_a_stream_whose_caller_did_not_ask_is_counted_and_looks_untouched(gateway, upstreams):
    before = tokens(gateway, "team", "gpt-4.1", "input")
    messages = [{"role": "user", "content": "stream me"}]
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {TEAM_KEY}"},
                      json={"model": "gpt-4.1", "stream": True, "messages": messages}) as response:
        assert response.status_code == 200
        received = b"".join(response.iter_raw())
    sent = json.loads(upstreams["v1"].only().body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "gpt41-prod"
    # Exactly what the caller would have got without include_usage.
    upstreams["v1"].reset()
    upstreams["v1"].responder = azure_like
    plain = azure_like(type("R", (), {"path": "/openai/v1/chat/completions",
                                      "body": json.dumps({"stream": True, "messages": messages})
                                      .encode()})())
    assert received == b"".join(plain.body)
    assert b"usage" not in received
    want = before + usage_of({"messages": messages})["prompt_tokens"]
    assert wait_for(gateway, "azure_openai_tokens_total", want, caller="team", model="gpt-4.1",
                    type="input") == want


def test_a_stream_whose_caller_asked_gets_its_usage_event_once(gateway, upstreams):
    before = tokens(gateway, "team", "gpt-4o", "input")
    messages = [{"role": "user", "content": "I asked"}]
    stream = client(gateway).chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].choices == []
    sent = json.loads(upstreams["azure"].only().body)
    assert sent["stream_options"] == {"include_usage": True}
    want = before + usage_of({"messages": messages})["prompt_tokens"]
    assert wait_for(gateway, "azure_openai_tokens_total", want, caller="team", model="gpt-4o",
                    type="input") == want


def test_streams_are_not_asked_where_the_api_version_refuses_it(gateway, upstreams):
    response = httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {OPS_KEY}"},
                          json={"model": "gpt-35", "stream": True, "messages": []})
    assert response.status_code == 200
    assert "stream_options" not in json.loads(upstreams["old"].only().body)


def test_responses_and_embeddings_are_counted(gateway, upstreams):
    ops = client(gateway, OPS_KEY)
    before_in = tokens(gateway, "ops", "gpt-4o", "input")
    before_reasoning = tokens(gateway, "ops", "gpt-4o", "reasoning_output")
    ops.responses.create(model="gpt-4o", input="hello")
    events = [event.type for event in ops.responses.create(model="gpt-4o", input="hello",
                                                           stream=True)]
    assert events[-1] == "response.completed"
    per = usage_of({"input": "hello"})["prompt_tokens"]
    assert wait_for(gateway, "azure_openai_tokens_total", before_in + 2 * per, caller="ops",
                    model="gpt-4o", type="input") == before_in + 2 * per
    assert tokens(gateway, "ops", "gpt-4o", "reasoning_output") == before_reasoning + 6
    before_embed = tokens(gateway, "ops", "embed", "input")
    ops.embeddings.create(model="embed", input="x", encoding_format="float")
    want = before_embed + usage_of({"input": "x"})["prompt_tokens"]
    assert wait_for(gateway, "azure_openai_tokens_total", want, caller="ops", model="embed",
                    type="input") == want


def test_rejections_are_counted_with_their_status(gateway, upstreams):
    def count(**labels):
        return series(gateway, "azure_openai_requests_total", **labels)

    before_401 = count(caller="-", status="401")
    before_404 = count(caller="team", model="-", status="404")
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
               headers={"authorization": "Bearer sk-unknown"}, timeout=10)
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "embed"},
               headers={"authorization": f"Bearer {TEAM_KEY}"}, timeout=10)
    assert wait_for(gateway, "azure_openai_requests_total", before_401 + 1,
                    caller="-", status="401") == before_401 + 1
    # The two requests may have been served by different workers, each
    # flushing its counts on its own tick: wait for each.
    assert wait_for(gateway, "azure_openai_requests_total", before_404 + 1,
                    caller="team", model="-", status="404") == before_404 + 1
    assert all(not server.received for server in upstreams.values())


def test_caller_sent_strings_never_become_labels(gateway, upstreams):
    for model in ["evil", "x;.;caller=.=forged", "gpt-4o\n", "../../etc"]:
        httpx.post(gateway.url + "/v1/chat/completions", json={"model": model},
                   headers={"authorization": f"Bearer {TEAM_KEY}"}, timeout=10)
    httpx.post(gateway.url + "/v1/chat/completions?caller=forged", json={"model": "gpt-4o"},
               headers={"authorization": f"Bearer {TEAM_KEY}", "x-caller": "forged"}, timeout=10)
    time.sleep(1.5)
    text = httpx.get(gateway.admin + "/stats/prometheus", timeout=5).text
    ours = "\n".join(line for line in text.splitlines() if "azure_openai" in line)
    for sent in ("evil", "forged", "etc/", "\\n"):
        assert sent not in ours, sent
    allowed = {"team", "ops", "-", "gpt-4o", "gpt-4.1", "embed", "gpt-35", "azure", "v1", "old",
               "gpt4o-prod", "gpt41-prod", "embed-prod", "gpt35-old"}
    for (name, labels) in scrape(gateway):
        for label, value in labels:
            if label in ("caller", "model", "upstream", "deployment"):
                assert value in allowed, (name, label, value)


def test_latency_histograms_and_remaining_quota(gateway, upstreams):
    def both():
        """The +Inf bucket and the count, from one scrape (a worker flushes
        both at once; two scrapes could straddle another worker's flush)."""
        seen = scrape(gateway)
        def total(name, **labels):
            wanted = set(labels.items())
            return sum(v for (n, ls), v in seen.items() if n == name and wanted <= set(ls))
        return (total("azure_openai_time_to_first_byte_ms_bucket", caller="team",
                      model="gpt-4o", le="+Inf"),
                total("azure_openai_time_to_first_byte_ms_count", caller="team", model="gpt-4o"))

    before = series(gateway, "azure_openai_request_duration_ms_count", caller="team",
                    model="gpt-4o", deployment="gpt4o-prod")
    client(gateway).chat.completions.create(model="gpt-4o", messages=[])
    assert wait_for(gateway, "azure_openai_request_duration_ms_count", before + 1, caller="team",
                    model="gpt-4o", deployment="gpt4o-prod") >= before + 1
    inf, count = both()
    assert inf == count >= 1
    assert series(gateway, "azure_openai_ratelimit_remaining_requests", upstream="azure",
                  deployment="gpt4o-prod") == 41
    assert series(gateway, "azure_openai_ratelimit_remaining_tokens", upstream="azure",
                  deployment="gpt4o-prod") == 9000


def test_every_series_the_grafana_dashboard_reads_is_in_a_real_scrape(gateway, upstreams):
    """deploy/grafana-dashboard.json against /stats/prometheus after traffic
    of every kind the dashboard shows (including Azure's 429 and quota)."""
    from dashboard import series as dashboard_series

    client(gateway).chat.completions.create(model="gpt-4o", messages=[])
    upstreams["azure"].responder = lambda r: Reply(
        429, {"content-type": "application/json", "retry-after": "1",
              "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"},
        b'{"error":{"code":"429","message":"slow down"}}')
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
               headers={"authorization": f"Bearer {TEAM_KEY}"}, timeout=10)
    time.sleep(1.5)
    scraped = scrape(gateway)
    for name, labels in dashboard_series().items():
        present = [set(dict(ls)) for (n, ls) in scraped if n == name]
        assert present, f"the dashboard reads {name}, which the scrape lacks"
        assert any(set(labels) <= have for have in present), (name, labels, present[:2])


def access_lines(gateway, count, timeout=5):
    """The access log's last `count` lines, parsed (Envoy flushes it a little later)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = gateway.access_log.read_text().splitlines() if gateway.access_log.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines[-count:]]
        time.sleep(0.05)


def test_the_access_log_carries_the_filters_fields_as_json(gateway, upstreams):
    start = len(gateway.access_log.read_text().splitlines()) if gateway.access_log.exists() else 0
    messages = [{"role": "user", "content": "log me"}]
    client(gateway).chat.completions.create(model="gpt-4o", messages=messages)
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {TEAM_KEY}"},
                      json={"model": "gpt-4.1", "stream": True, "messages": messages}) as response:
        b"".join(response.iter_raw())
    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
               headers={"authorization": "Bearer sk-not-a-key-9999"}, timeout=10)
    lines = access_lines(gateway, start + 3)[start:]
    usage = usage_of({"messages": messages})
    chat, stream, refused = lines
    assert chat["code"] == 200 and chat["path"] == "/openai/deployments/gpt4o-prod/chat/completions"
    assert chat["azure_openai"] == {
        "caller": "team", "model": "gpt-4o", "upstream": "azure", "deployment": "gpt4o-prod",
        "operation": "chat/completions", "status": 200,
        "input_tokens": usage["prompt_tokens"], "output_tokens": 7,
        "ttfb_ms": chat["azure_openai"]["ttfb_ms"]}
    assert isinstance(chat["azure_openai"]["ttfb_ms"], int)
    assert stream["azure_openai"]["upstream"] == "v1"
    assert stream["azure_openai"]["input_tokens"] == usage["prompt_tokens"]
    assert refused["code"] == 401 and refused["details"] == "azure_openai_filter"
    assert refused["azure_openai"] == {
        "caller": None, "model": None, "upstream": None, "deployment": None, "operation": None,
        "status": 401, "input_tokens": None, "output_tokens": None, "ttfb_ms": None}
    text = gateway.access_log.read_text()
    assert TEAM_KEY not in text and "sk-not-a-key-9999" not in text and "k1" not in text
