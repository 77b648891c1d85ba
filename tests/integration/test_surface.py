"""The whole OpenAI surface through a real Envoy: every operation, Azure's
v1 API, Azure-style callers, an OpenAI-compatible upstream, the model list,
and Azure error translation. Upstreams record what they received; the
OpenAI Python SDK makes its own calls."""

import io
import json
import time
import uuid

import httpx
import openai
import pytest
from harness import (Envoy, RecordingUpstream, Reply, assert_openai_error, bootstrap, cluster,
                     sha256_hex, wasm_filter)

TEAM_KEY = "sk-surface-team-0001"
OPS_KEY = "sk-surface-ops-0002"
AZURE_KEY = "azure-deployments-key"
V1_KEY = "azure-v1-key"
VLLM_TOKEN = "vllm-bearer-token"
BOUNDARY_AUDIO = bytes(range(256)) * 4096  # 1 MiB of every byte value, CRLFs and dashes included


def shaped_reply(request):
    """Answers in the shape of the operation the path names."""
    path = request.path.split("?")[0]
    now = int(time.time())
    if path.endswith("/audio/speech"):
        audio = b"ID3" + bytes(range(256)) * 64
        chunks = [audio[i:i + 4096] for i in range(0, len(audio), 4096)]
        return Reply(200, {"content-type": "audio/mpeg"}, chunks)
    if path.endswith("/audio/transcriptions") or path.endswith("/audio/translations"):
        return json_reply({"text": "hello from the stand-in"})
    if path.endswith("/images/generations") or path.endswith("/images/edits"):
        return json_reply({"created": now, "data": [{"b64_json": "aGVsbG8=", "revised_prompt": "p"}]})
    if path.endswith("/embeddings"):
        return json_reply({"object": "list", "model": "m", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    if "/responses/" in path:
        rid = path.rsplit("/responses/", 1)[1].split("/")[0]
        if request.method == "DELETE":
            return json_reply({"id": rid, "object": "response", "deleted": True})
        return json_reply(response_object(rid))
    if path.endswith("/responses"):
        return json_reply(response_object("resp_" + uuid.uuid4().hex[:12]))
    if path.endswith("/completions") and "/chat/" not in path:
        return json_reply({"id": "cmpl-1", "object": "text_completion", "created": now, "model": "m",
                           "choices": [{"index": 0, "text": "ok", "finish_reason": "stop",
                                        "logprobs": None}]})
    return json_reply({"id": "chatcmpl-1", "object": "chat.completion", "created": now, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                    "message": {"role": "assistant", "content": "hi"}}]})


def response_object(rid):
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
            "model": "gpt-4o-2024-08-06", "output": [{
                "type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "hi from responses", "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def json_reply(body, status=200):
    return Reply(status, {"content-type": "application/json"}, json.dumps(body).encode())


@pytest.fixture(scope="module")
def upstreams():
    servers = {name: RecordingUpstream(name) for name in ("azure", "v1", "vllm")}
    for server in servers.values():
        server.responder = shaped_reply
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh(upstreams):
    for server in upstreams.values():
        server.received.clear()
        server.responder = shaped_reply
    yield


@pytest.fixture(scope="module")
def gateway(upstreams):
    config = {
        "max_request_body_bytes": 8 * 1024 * 1024,
        "responses_upstream": "azure",
        "upstreams": {
            "azure": {"endpoint": f"http://127.0.0.1:{upstreams['azure'].port}", "cluster": "azure",
                      "api_versions": {"audio/transcriptions": "2024-06-01"},
                      "auth": {"api_key": {"value": AZURE_KEY}}},
            "v1": {"endpoint": f"http://127.0.0.1:{upstreams['v1'].port}", "cluster": "v1",
                   "api": "v1", "auth": {"api_key": {"value": V1_KEY}}},
            "vllm": {"kind": "openai", "endpoint": f"http://127.0.0.1:{upstreams['vllm'].port}/v1",
                     "cluster": "vllm", "auth": {"bearer": {"value": VLLM_TOKEN}}},
        },
        "models": {
            "gpt-4o": {"upstream": "azure", "deployment": "gpt4o-prod"},
            "text-embedding-3-small": {"upstream": "azure", "deployment": "embed-prod"},
            "gpt-35-turbo-instruct": {"upstream": "azure", "deployment": "instruct-prod"},
            "dall-e-3": {"upstream": "azure", "deployment": "dalle-prod"},
            "gpt-image-1": {"upstream": "azure", "deployment": "image-prod"},
            "whisper-1": {"upstream": "azure", "deployment": "whisper-prod"},
            "tts-1": {"upstream": "azure", "deployment": "tts-prod"},
            "gpt-4.1": {"upstream": "v1", "deployment": "gpt41-prod"},
            "whisper-v1": {"upstream": "v1", "deployment": "whisper-v1-prod"},
            "llama": {"upstream": "vllm", "deployment": "meta-llama/Llama-3.1-8B-Instruct"},
        },
        "callers": [
            {"name": "team", "key_sha256": sha256_hex(TEAM_KEY), "models": ["gpt-4o", "whisper-1"]},
            {"name": "ops", "key_sha256": sha256_hex(OPS_KEY), "models": ["*"]},
        ],
    }
    envoy = Envoy(bootstrap([wasm_filter(config)], [cluster(n, s.port) for n, s in upstreams.items()]))
    envoy.start()
    yield envoy
    envoy.cleanup()


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=OPS_KEY, max_retries=0)


def only(server):
    assert len(server.received) == 1, f"{server.name} received {len(server.received)}"
    return server.received[0]


def assert_azure_credentials(request, key=AZURE_KEY):
    assert request.all("api-key") == [key]
    assert request.all("authorization") == []


def multipart_parts(request):
    """The form fields and files the upstream received (name -> bytes)."""
    content_type = request.header("content-type")
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    parts = {}
    for chunk in request.body.split(b"--" + boundary)[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = content[:-2]
    return parts


# ------------------------------------------------------------- every operation, OpenAI SDK

def test_images_generations(client, upstreams):
    result = client.images.generate(model="dall-e-3", prompt="a lighthouse", size="1024x1024")
    assert result.data[0].b64_json == "aGVsbG8="
    got = only(upstreams["azure"])
    assert got.path == "/openai/deployments/dalle-prod/images/generations?api-version=2024-10-21"
    assert json.loads(got.body) == {"model": "dall-e-3", "prompt": "a lighthouse", "size": "1024x1024"}
    assert_azure_credentials(got)


def test_images_edits_multipart(client, upstreams):
    image = b"\x89PNG\r\n\x1a\n" + BOUNDARY_AUDIO[:100_000]
    result = client.images.edit(model="gpt-image-1", image=("in.png", image, "image/png"),
                                prompt="add a hat")
    assert result.data[0].b64_json == "aGVsbG8="
    got = only(upstreams["azure"])
    assert got.path == "/openai/deployments/image-prod/images/edits?api-version=2025-04-01-preview"
    parts = multipart_parts(got)
    assert parts["image"] == image
    assert parts["model"] == b"gpt-image-1"  # deployments API: the body is untouched
    assert_azure_credentials(got)


@pytest.mark.parametrize("operation, version", [
    ("transcriptions", "2024-06-01"),  # set per operation in api_versions
    ("translations", "2024-10-21"),
])
def test_audio_transcriptions_and_translations(client, upstreams, operation, version):
    create = getattr(client.audio, operation).create
    result = create(model="whisper-1", file=("speech.mp3", BOUNDARY_AUDIO, "audio/mpeg"))
    assert result.text == "hello from the stand-in"
    got = only(upstreams["azure"])
    assert got.path == f"/openai/deployments/whisper-prod/audio/{operation}?api-version={version}"
    assert multipart_parts(got)["file"] == BOUNDARY_AUDIO
    assert int(got.header("content-length")) == len(got.body)
    assert_azure_credentials(got)


def test_audio_speech_streams_binary_back(client, upstreams):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Hello there") as response:
        audio = b"".join(response.iter_bytes())
    assert audio == b"ID3" + bytes(range(256)) * 64
    got = only(upstreams["azure"])
    assert got.path == "/openai/deployments/tts-prod/audio/speech?api-version=2025-04-01-preview"
    assert json.loads(got.body)["input"] == "Hello there"


def test_responses_api_create_retrieve_delete(client, upstreams):
    created = client.responses.create(model="gpt-4o", input="Say hi")
    assert created.output_text == "hi from responses"
    got = only(upstreams["azure"])
    assert got.path == "/openai/responses?api-version=2025-04-01-preview"
    sent = json.loads(got.body)
    assert sent == {"input": "Say hi", "model": "gpt4o-prod"}  # the deployment, in the body
    assert int(got.header("content-length")) == len(got.body)
    assert_azure_credentials(got)

    upstreams["azure"].received.clear()
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id
    client.responses.delete(created.id)
    paths = [(r.method, r.path) for r in upstreams["azure"].received]
    assert paths == [
        ("GET", f"/openai/responses/{created.id}?api-version=2025-04-01-preview"),
        ("DELETE", f"/openai/responses/{created.id}?api-version=2025-04-01-preview"),
    ]


def test_model_list_and_retrieve_per_caller(gateway, client):
    assert sorted(m.id for m in client.models.list()) == sorted([
        "gpt-4o", "text-embedding-3-small", "gpt-35-turbo-instruct", "dall-e-3", "gpt-image-1",
        "whisper-1", "tts-1", "gpt-4.1", "whisper-v1", "llama"])
    team = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_KEY, max_retries=0)
    assert [m.id for m in team.models.list()] == ["gpt-4o", "whisper-1"]
    assert team.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as raised:
        team.models.retrieve("tts-1")
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-nope", max_retries=0).models.list()


# ------------------------------------------------------------- Azure v1 API

def test_v1_api_chat_puts_the_deployment_in_the_body(client, upstreams):
    result = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "hi"
    got = only(upstreams["v1"])
    assert got.path == "/openai/v1/chat/completions"
    assert json.loads(got.body) == {"messages": [{"role": "user", "content": "x"}], "model": "gpt41-prod"}
    assert int(got.header("content-length")) == len(got.body)
    assert_azure_credentials(got, V1_KEY)


def test_v1_api_multipart_rewrites_only_the_model_field(client, upstreams):
    client.audio.transcriptions.create(model="whisper-v1", file=("a.wav", BOUNDARY_AUDIO, "audio/wav"))
    got = only(upstreams["v1"])
    assert got.path == "/openai/v1/audio/transcriptions"
    parts = multipart_parts(got)
    assert parts["model"] == b"whisper-v1-prod"
    assert parts["file"] == BOUNDARY_AUDIO
    assert int(got.header("content-length")) == len(got.body)


def test_model_field_after_a_large_file(gateway, upstreams):
    """Field order is free: the model may come after the file."""
    boundary = "----gw-test-boundary"
    audio = BOUNDARY_AUDIO * 3
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n"
            f"Content-Type: audio/mpeg\r\n\r\n").encode() + audio + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-v1\r\n"
        f"--{boundary}--\r\n").encode()
    response = httpx.post(gateway.url + "/v1/audio/transcriptions", content=body, timeout=30,
                          headers={"authorization": f"Bearer {OPS_KEY}",
                                   "content-type": f'multipart/form-data; boundary="{boundary}"'})
    assert response.status_code == 200, response.text
    got = only(upstreams["v1"])
    parts = multipart_parts(got)
    assert parts["file"] == audio
    assert parts["model"] == b"whisper-v1-prod"
    assert int(got.header("content-length")) == len(got.body) == len(body) + len("-prod")


# ------------------------------------------------------------- OpenAI-compatible upstream

def test_openai_compatible_upstream(client, upstreams):
    result = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "hi"
    got = only(upstreams["vllm"])
    assert got.path == "/v1/chat/completions"
    assert json.loads(got.body)["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert got.all("authorization") == [f"Bearer {VLLM_TOKEN}"]
    assert got.all("api-key") == []
    assert OPS_KEY not in repr(got.headers)


# ------------------------------------------------------------- Azure-style callers

def test_azure_openai_client_works_against_the_gateway(gateway, upstreams):
    azure = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=OPS_KEY,
                               api_version="2023-05-15", max_retries=0)
    result = azure.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "hi"
    embedding = azure.embeddings.create(model="text-embedding-3-small", input="x")
    assert embedding.data[0].embedding == [0.1, 0.2]
    transcript = azure.audio.transcriptions.create(model="whisper-1", file=("a.mp3", b"\x00\x01", "audio/mpeg"))
    assert transcript.text == "hello from the stand-in"
    paths = [r.path for r in upstreams["azure"].received]
    # The caller's api-version (2023-05-15) is replaced by the configured one.
    assert paths == [
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
        "/openai/deployments/embed-prod/embeddings?api-version=2024-10-21",
        "/openai/deployments/whisper-prod/audio/transcriptions?api-version=2024-06-01",
    ]
    for request in upstreams["azure"].received:
        assert_azure_credentials(request)


def test_azure_style_path_to_a_v1_upstream_sets_the_body_model(gateway, upstreams):
    response = httpx.post(gateway.url + "/openai/deployments/gpt-4.1/chat/completions?api-version=2024-10-21",
                          json={"messages": []}, headers={"api-key": OPS_KEY}, timeout=30)
    assert response.status_code == 200, response.text
    got = only(upstreams["v1"])
    assert got.path == "/openai/v1/chat/completions"
    assert json.loads(got.body) == {"model": "gpt41-prod", "messages": []}
    assert int(got.header("content-length")) == len(got.body)


def test_azure_style_path_respects_the_allowlist(gateway, upstreams):
    response = httpx.post(gateway.url + "/openai/deployments/tts-1/audio/speech?api-version=x",
                          json={"input": "x"}, headers={"api-key": TEAM_KEY}, timeout=30)
    assert_openai_error(response, 404, "model_not_found")
    assert all(not s.received for s in upstreams.values())


# ------------------------------------------------------------- Azure errors in OpenAI's shape

def test_azure_401_envelope_becomes_openai_error(client, upstreams):
    upstreams["azure"].responder = lambda r: json_reply(
        {"statusCode": 401, "message": "Unauthorized. Access token is missing, invalid, audience is "
                                       "incorrect (https://cognitiveservices.azure.com), or have expired."},
        401)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    error = raised.value.body
    assert raised.value.code == "upstream_unauthorized"
    assert "upstream `azure`" in error["message"] and "Access token is missing" in error["message"]


def test_deployment_not_found_names_the_alias_never_the_deployment(client, gateway, upstreams):
    upstreams["azure"].responder = lambda r: json_reply(
        {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource "
                                                            "does not exist: gpt4o-prod."}}, 404)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raised.value.code == "model_not_found"
    assert raised.value.body["message"] == "The model `gpt-4o` does not exist or you do not have access to it."
    assert "gpt4o-prod" not in json.dumps(raised.value.body)
    assert gateway.wait_for_log("has no deployment for model alias `gpt-4o`")


def test_other_azure_errors_pass_through_unchanged(gateway, upstreams):
    body = json.dumps({"error": {"message": "The response was filtered", "type": None, "param": "prompt",
                                 "code": "content_filter", "status": 400, "innererror": {
                                     "code": "ResponsibleAIPolicyViolation",
                                     "content_filter_result": {"hate": {"filtered": True, "severity": "high"}}}}}).encode()
    upstreams["azure"].responder = lambda r: Reply(400, {"content-type": "application/json"}, body)
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                          headers={"authorization": f"Bearer {OPS_KEY}"}, timeout=30)
    assert response.status_code == 400 and response.content == body
    key_error = json.dumps({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}).encode()
    upstreams["azure"].responder = lambda r: Reply(401, {"content-type": "application/json"}, key_error)
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                          headers={"authorization": f"Bearer {OPS_KEY}"}, timeout=30)
    assert response.status_code == 401 and response.content == key_error


def test_openai_upstream_errors_are_not_translated(gateway, upstreams):
    body = json.dumps({"statusCode": 401, "message": "custom"}).encode()
    upstreams["vllm"].responder = lambda r: Reply(401, {"content-type": "application/json"}, body)
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "llama", "messages": []},
                          headers={"authorization": f"Bearer {OPS_KEY}"}, timeout=30)
    assert response.status_code == 401 and response.content == body


# ------------------------------------------------------------- malformed multipart

def multipart(body, content_type):
    return body, {"authorization": f"Bearer {OPS_KEY}", "content-type": content_type}


@pytest.mark.parametrize("content_type, body, detail", [
    ("multipart/form-data", b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--x--\r\n",
     "no boundary"),
    ("multipart/form-data; boundary=x",
     b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc\r\n--x--\r\n",
     "no `model` field"),
    ("multipart/form-data; boundary=x",
     b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--x\r\n"
     b"Content-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc", "truncated"),
    ("application/json", b'{"model":"whisper-1"}', "multipart/form-data"),
])
def test_malformed_multipart_is_400_and_not_forwarded(gateway, upstreams, content_type, body, detail):
    response = httpx.post(gateway.url + "/v1/audio/transcriptions", content=body, timeout=30,
                          headers={"authorization": f"Bearer {OPS_KEY}", "content-type": content_type})
    error = assert_openai_error(response, 400, "invalid_multipart")
    assert detail in error["message"], error["message"]
    assert all(not s.received for s in upstreams.values())


def test_stored_response_of_an_unreachable_upstream_is_404(gateway, upstreams):
    team = {"authorization": f"Bearer {TEAM_KEY}"}
    response = httpx.get(gateway.url + "/v1/responses/resp_abc", headers=team, timeout=30)
    assert response.status_code == 200  # team has gpt-4o on the responses upstream
    response = httpx.get(gateway.url + "/v1/responses/..%2Fx", headers=team, timeout=30)
    assert_openai_error(response, 404, "unknown_url")
    assert [r.path for r in upstreams["azure"].received] == [
        "/openai/responses/resp_abc?api-version=2025-04-01-preview"]


def test_image_upload_with_io_object(client, upstreams):
    """The SDK's file objects (not just bytes) go through byte for byte."""
    image = bytes(range(256)) * 100
    client.images.edit(model="gpt-image-1", image=("x.png", io.BytesIO(image), "image/png"), prompt="p")
    assert multipart_parts(only(upstreams["azure"]))["image"] == image
