"""Responses flow back untouched: SSE chunk by chunk, Azure errors and
rate-limit headers as Azure sent them."""

import json
import time

import httpx
from conftest import TEAM_A_KEY
from harness import Reply

CHAT = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
HEADERS = {"authorization": f"Bearer {TEAM_A_KEY}", "content-type": "application/json"}


def sse_events(count):
    events = [b'data: {"id":"","object":"","created":0,"model":"","choices":[],'
              b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}\n\n']
    for i in range(count):
        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
                 "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
        events.append(f"data: {json.dumps(chunk)}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def test_sse_stream_is_not_buffered(gateway, west):
    delay = 0.3
    events = sse_events(5)
    west.responder = lambda request: Reply(200, {"content-type": "text/event-stream"}, events, delay)

    arrivals = []
    received = b""
    started = time.monotonic()
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=CHAT,
                      headers=HEADERS, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for piece in response.iter_raw():
            received += piece
            while received.count(b"\n\n") > len(arrivals):
                arrivals.append(time.monotonic() - started)
    assert received == b"".join(events)
    assert len(arrivals) == len(events)
    # Each event arrived about when the upstream sent it, not all at the end:
    # the first well before the stream ended, and the rest spread over it.
    total = delay * (len(events) - 1)
    assert arrivals[0] < arrivals[-1] - total * 0.6, arrivals
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gap > delay * 0.5 for gap in gaps) >= len(gaps) - 1, gaps
    assert west.only().path.endswith("/chat/completions?api-version=2024-10-21")


def test_upstream_429_passes_through_unchanged(gateway, west):
    body = json.dumps({"error": {"code": "429", "message": "Requests to the ChatCompletions_Create "
                                 "Operation have exceeded the token rate limit. Please retry after "
                                 "6 seconds."}}).encode()
    headers = {"content-type": "application/json", "retry-after": "6", "retry-after-ms": "6000",
               "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0",
               "x-ratelimit-limit-requests": "60", "apim-request-id": "abc-123", "x-ms-region": "East US"}
    west.responder = lambda request: Reply(429, headers, body)
    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=30)
    assert response.status_code == 429
    assert response.content == body
    for name, value in headers.items():
        assert response.headers[name] == value


def test_azure_content_filter_error_passes_through(gateway, west):
    body = json.dumps({"error": {"message": "The response was filtered", "type": None,
                                 "param": "prompt", "code": "content_filter", "status": 400,
                                 "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                "content_filter_result": {"hate": {"filtered": True,
                                                                                   "severity": "high"}}}}}).encode()
    west.responder = lambda request: Reply(400, {"content-type": "application/json"}, body)
    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=30)
    assert response.status_code == 400
    assert response.content == body


def test_upstream_5xx_passes_through(gateway, west):
    west.responder = lambda request: Reply(503, {"content-type": "text/plain"}, b"upstream busy")
    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=30)
    assert response.status_code == 503
    assert response.text == "upstream busy"


def test_large_response_streams_back_whole(gateway, west):
    payload = b"x" * (3 * 1024 * 1024)
    west.responder = lambda request: Reply(200, {"content-type": "application/octet-stream"},
                                           [payload[i:i + 65536] for i in range(0, len(payload), 65536)])
    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=30)
    assert response.status_code == 200
    assert response.content == payload
