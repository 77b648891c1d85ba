"""The official OpenAI Python SDK, unchanged, against the gateway."""

import json

import openai
import pytest
from conftest import OPS_KEY, TEAM_A_KEY, WEST_KEY
from harness import Reply


def azure_like(request):
    """Answers like an Azure deployment, streaming when asked to."""
    body = json.loads(request.body)
    if request.path.startswith("/openai/deployments/embed-prod/embeddings"):
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                for i, _ in enumerate(inputs)]
        payload = {"object": "list", "data": data, "model": "text-embedding-3-small",
                   "usage": {"prompt_tokens": 2, "total_tokens": 2}}
        return Reply(200, {"content-type": "application/json"}, json.dumps(payload).encode())
    if "/completions" in request.path and "/chat/" not in request.path:
        payload = {"id": "cmpl-1", "object": "text_completion", "created": 1,
                   "model": "gpt-35-turbo-instruct",
                   "choices": [{"index": 0, "text": "legacy ok", "finish_reason": "stop",
                                "logprobs": None}]}
        return Reply(200, {"content-type": "application/json"}, json.dumps(payload).encode())
    if body.get("stream"):
        chunks = [{"id": "", "object": "", "created": 0, "model": "", "choices": [],
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}]
        for word in ["Hello", " from", " Azure"]:
            chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                           "model": "gpt-4o-2024-08-06",
                           "choices": [{"index": 0, "delta": {"content": word},
                                        "finish_reason": None}]})
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                       "model": "gpt-4o-2024-08-06",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
        return Reply(200, {"content-type": "text/event-stream"}, events, 0.01)
    payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
               "model": "gpt-4o-2024-08-06",
               "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                            "message": {"role": "assistant", "content": "Hello from Azure"}}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    return Reply(200, {"content-type": "application/json"}, json.dumps(payload).encode())


@pytest.fixture
def client(gateway, west):
    west.responder = azure_like
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A_KEY, max_retries=0)


@pytest.fixture
def ops_client(gateway, west):
    west.responder = azure_like
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=OPS_KEY, max_retries=0)


def test_chat_completion(client, west):
    result = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], temperature=0.2)
    assert result.choices[0].message.content == "Hello from Azure"
    got = west.only()
    assert got.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert got.all("api-key") == [WEST_KEY]
    assert got.all("authorization") == []
    assert json.loads(got.body) == {"messages": [{"role": "user", "content": "Hi"}],
                                    "model": "gpt-4o", "temperature": 0.2}


def test_chat_completion_stream(client, west):
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from Azure"
    assert json.loads(west.only().body)["stream"] is True


def test_embeddings(ops_client, west):
    result = ops_client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.index for d in result.data] == [0, 1]
    assert west.only().path == "/openai/deployments/embed-prod/embeddings?api-version=2024-10-21"


def test_legacy_completions(ops_client, west):
    result = ops_client.completions.create(model="gpt-35-turbo-instruct", prompt="Say ok")
    assert result.choices[0].text == "legacy ok"
    assert west.only().path == "/openai/deployments/instruct-prod/completions?api-version=2024-10-21"


def test_sdk_raises_authentication_error(gateway, west):
    bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.code == "invalid_api_key"
    assert west.received == []


def test_sdk_raises_not_found_for_models_outside_the_allowlist(client, west):
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert raised.value.code == "model_not_found"
    assert west.received == []
