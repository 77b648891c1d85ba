"""Configurations: bad ones stop Envoy at start with a message naming the
field; every example under envoy/ loads into a real Envoy."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml
from conftest import gateway_config
from harness import (ACCESS_LOG_FORMAT, NATIVE, NATIVE_MODULE, ROOT, STATS_TAGS, WASM, Envoy,
                     assert_openai_error, bootstrap, cluster, local_reply_config, validate,
                     wasm_filter)

EXAMPLES = sorted((ROOT / "envoy").glob("*.yaml"))


def broken(change):
    config = gateway_config(1, 2)
    change(config)
    return config


BAD_CONFIGS = [
    ("unknown field",
     broken(lambda c: c["upstreams"]["west"].update(apiversion="2024-10-21")),
     "upstreams.west.apiversion: unknown field `apiversion`"),
    ("missing env var",
     broken(lambda c: c["upstreams"]["west"]["auth"]["api_key"].update(env="NOT_PROVIDED")),
     "upstreams.west.auth.api_key.env: environment variable `NOT_PROVIDED` is not visible"),
    ("model on unknown upstream",
     broken(lambda c: c["models"]["gpt-4o"].update(upstream="north")),
     "models.gpt-4o.upstream: unknown upstream `north`"),
    ("allowlist names unknown alias",
     broken(lambda c: c["callers"][0].update(models=["gpt-4o", "gpt-5"])),
     "callers[0].models[1]: unknown model alias `gpt-5`"),
    ("duplicate caller names",
     broken(lambda c: c["callers"][1].update(name="team-a")),
     "callers[1].name: duplicate caller name `team-a`"),
    ("duplicate key hashes",
     broken(lambda c: c["callers"][1].update(key_sha256=c["callers"][0]["key_sha256"])),
     "callers[1].key_sha256: same key hash as callers[0]"),
    ("malformed hash",
     broken(lambda c: c["callers"][0].update(key_sha256="abc123")),
     "callers[0].key_sha256: must be the SHA-256 of the caller key as 64 lowercase hex digits"),
    ("empty deployment",
     broken(lambda c: c["models"]["gpt-4o"].update(deployment="")),
     "models.gpt-4o.deployment: must not be empty"),
    ("entra client_id is not a GUID",
     broken(lambda c: c["upstreams"]["west"].update(auth={"entra": {
         "tenant_id": "contoso.onmicrosoft.com", "client_id": "my-app",
         "client_secret": {"value": "s"}, "token_cluster": "entra"}})),
     "upstreams.west.auth.entra.client_id: `my-app` is not a GUID"),
    ("endpoint with a path",
     broken(lambda c: c["upstreams"]["west"].update(endpoint="https://x.openai.azure.com/openai")),
     "upstreams.west.endpoint: must be an origin"),
    ("zero request limit",
     broken(lambda c: c["callers"][0].update(limits={"requests_per_minute": 0})),
     "callers[0].limits.requests_per_minute: must be 1 to"),
    ("unknown limit",
     broken(lambda c: c["callers"][0].update(limits={"requests_per_hour": 5})),
     "callers[0].limits.requests_per_hour: unknown field"),
    ("hop-by-hop extra header",
     broken(lambda c: c["upstreams"]["west"].update(headers={"Connection": {"value": "x"}})),
     "upstreams.west.headers.Connection: is a hop-by-hop header"),
    ("extra header the filter sets",
     broken(lambda c: c["upstreams"]["west"].update(headers={"api-key": {"value": "x"}})),
     "upstreams.west.headers.api-key: is a header the filter sets or removes itself"),
    ("extra header that is the routing header",
     broken(lambda c: c["upstreams"]["west"].update(
         headers={"x-azure-openai-cluster": {"value": "x"}})),
     "upstreams.west.headers.x-azure-openai-cluster: is a header the filter sets or removes"),
    ("pseudo-header as extra header",
     broken(lambda c: c["upstreams"]["west"].update(headers={":path": {"value": "/x"}})),
     "upstreams.west.headers.:path: is a pseudo-header"),
    ("extra header name not a token",
     broken(lambda c: c["upstreams"]["west"].update(headers={"x y": {"value": "x"}})),
     "upstreams.west.headers.x y: is not a valid header name"),
    ("extra header value with a line break",
     broken(lambda c: c["upstreams"]["west"].update(headers={"x-a": {"value": "a\r\nb"}})),
     "upstreams.west.headers.x-a.value: the secret contains characters a header cannot carry"),
    ("caller credentials for an unknown caller",
     broken(lambda c: c["upstreams"]["west"].update(caller_credentials={"callers": ["nobody"]})),
     "upstreams.west.caller_credentials.callers[0]: no caller is named `nobody`"),
]


@pytest.mark.parametrize("name, config, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_stops_envoy(envoy_factory, name, config, message):
    envoy = envoy_factory(
        bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                  [cluster("azure_west", 1), cluster("azure_east", 2)]),
        env={"AZURE_WEST_KEY": "k"})
    code, log = envoy.run_expecting_failure()
    assert code != 0
    assert f"configuration refused: {message}" in log, log[-3000:]


def test_configuration_that_is_not_json_stops_envoy(envoy_factory):
    envoy = envoy_factory(bootstrap([wasm_filter(None, config_text="{upstreams: nope}")], []))
    code, log = envoy.run_expecting_failure()
    assert code != 0
    assert "configuration refused: configuration: key must be a string" in log, log[-3000:]


def test_bad_configuration_fails_validate_mode_too(tmp_path):
    config = broken(lambda c: c["models"]["gpt-4o"].update(upstream="north"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                                         [cluster("azure_west", 1), cluster("azure_east", 2)])))
    code, output = validate(path, env={"AZURE_WEST_KEY": "k"})
    assert code != 0
    assert "models.gpt-4o.upstream: unknown upstream `north`" in output


# ------------------------------------------------------- envoy/ examples

EXAMPLE_ENV = {"AZURE_DEMO_KEY": "demo-upstream-key", "AZURE_WEST_KEY": "west-key",
               "AZURE_PTU_KEY": "ptu-key",
               "AZURE_EAST_KEY": "east-key", "AZURE_CLIENT_SECRET": "client-secret",
               "VLLM_TOKEN": "vllm-token",
               # Where envoy/native.yaml finds the native module.
               "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(NATIVE_MODULE.parent)}


def local_copy(example, tmp_path, upstream_port=None):
    """The example with the built module, ports chosen by the OS, and (for
    the demo) its stand-in at `upstream_port`."""
    config = yaml.safe_load(example.read_text())
    text = json.dumps(config)
    text = text.replace("/etc/envoy/azure_openai_filter.wasm", str(WASM))
    text = text.replace('"target/azure_openai_filter.wasm"', json.dumps(str(WASM)))
    if upstream_port:
        text = text.replace("127.0.0.1:10001", f"127.0.0.1:{upstream_port}")
        text = text.replace('"port_value": 10001', f'"port_value": {upstream_port}')
    config = json.loads(text)
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    path = tmp_path / example.name.replace(".yaml", ".json")
    path.write_text(json.dumps(config))
    return path


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"demo.yaml", "production.yaml", "entra.yaml", "managed-identity.yaml",
            "pools.yaml", "native.yaml"} <= names


def connection_managers(config):
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    yield network_filter["typed_config"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_carries_the_replies_and_stats_tags_the_tests_use(example):
    """The local_reply_config and stats_tags written out in each example are
    the very ones the suite runs with (harness.py), so they cannot drift."""
    config = yaml.safe_load(example.read_text())
    managers = list(connection_managers(config))
    assert managers, example
    for hcm in managers:
        header = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster_header"]
        assert hcm["local_reply_config"] == local_reply_config(header), example
    tags = [t for t in config["stats_config"]["stats_tags"]]
    assert tags == STATS_TAGS, example


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_envoy_validate(example, tmp_path):
    code, output = validate(local_copy(example, tmp_path), env=EXAMPLE_ENV)
    assert code == 0, output[-3000:]
    assert "configured:" in output  # the filter itself accepted its configuration


def test_production_example_serves(envoy_factory, tmp_path):
    envoy = envoy_factory(local_copy(ROOT / "envoy" / "production.yaml", tmp_path),
                          env=EXAMPLE_ENV).start()
    response = httpx.post(envoy.url + "/v1/chat/completions", json={"model": "gpt-4o"}, timeout=10)
    assert_openai_error(response, 401, "missing_api_key")
    response = httpx.post(envoy.url + "/v1/chat/completions", json={"model": "gpt-5"},
                          headers={"authorization": "Bearer replace-me-team-a-key"}, timeout=10)
    assert_openai_error(response, 404, "model_not_found")
    models = httpx.get(envoy.url + "/v1/models", timeout=10,
                       headers={"authorization": "Bearer replace-me-ops-key"}).json()
    assert [m["id"] for m in models["data"]] == [
        "gpt-4o", "whisper-1", "gpt-4o-mini", "text-embedding-3-small", "llama-3.1-8b"]


@pytest.mark.parametrize("example, reason", [
    ("entra.yaml", "could not be reached"),
    ("managed-identity.yaml", "the identity endpoint"),
])
def test_token_examples_serve_and_explain_an_unreachable_identity_endpoint(
        envoy_factory, tmp_path, example, reason):
    """Started as shipped (no network here): callers get 401 without a key,
    and a 503 naming the identity endpoint's failure, within max_wait_ms."""
    envoy = envoy_factory(local_copy(ROOT / "envoy" / example, tmp_path), env=EXAMPLE_ENV).start()
    response = httpx.post(envoy.url + "/v1/chat/completions", json={"model": "gpt-4o"}, timeout=10)
    assert_openai_error(response, 401, "missing_api_key")
    response = httpx.post(envoy.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                          headers={"authorization": "Bearer replace-me-team-a-key"}, timeout=20)
    error = assert_openai_error(response, 503, "token_unavailable")
    assert reason in error["message"], error["message"]
    assert "panicked" not in envoy.log()


def demo_deployments():
    demo = yaml.safe_load((ROOT / "envoy" / "demo.yaml").read_text())
    hcm = demo["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    config = json.loads(hcm["http_filters"][0]["typed_config"]["config"]["configuration"]["value"])
    return sorted({model["deployment"] for model in config["models"].values()})


def test_the_demo_logs_a_json_line_per_request_with_the_filters_fields():
    """The format test_usage.py checks line by line."""
    config = yaml.safe_load((ROOT / "envoy" / "demo.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (log,) = hcm["typed_config"]["access_log"]
    assert log["typed_config"]["path"] == "/dev/stdout"
    assert log["typed_config"]["log_format"]["text_format_source"]["inline_string"] == \
        ACCESS_LOG_FORMAT


def test_demo_script_starts_the_stand_in_with_every_demo_deployment():
    script = (ROOT / "envoy" / "demo.sh").read_text()
    for deployment in demo_deployments():
        assert deployment in script, deployment


@pytest.fixture
def demo_standin():
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "envoy" / "azure_standin.py"), "--port", "0", "--quiet",
         "--key", EXAMPLE_ENV["AZURE_DEMO_KEY"], "--chunk-delay", "0.01"]
        + [f"--deployment={d}" for d in demo_deployments()],
        stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    port = int(line.rsplit(":", 1)[1])
    yield port
    process.terminate()
    process.wait(timeout=10)


@pytest.mark.parametrize("example", ["demo.yaml", "native.yaml"])
def test_demo_gateway_works_with_the_openai_sdk(envoy_factory, tmp_path, demo_standin, example):
    """Every operation, through the demo gateway (the .wasm, and the same
    gateway with the native module: envoy/native.yaml), with the SDKs' own
    calls."""
    envoy = envoy_factory(local_copy(ROOT / "envoy" / example, tmp_path, demo_standin),
                          env=EXAMPLE_ENV).start()
    if example == "native.yaml":
        assert "Dynamic module ABI version v0.2.0 matched." in envoy.log()
        assert "(native) configured: 2 upstream(s)" in envoy.log()
    team_a = openai.OpenAI(base_url=envoy.url + "/v1", api_key="sk-demo-team-a", max_retries=0)
    ops = openai.OpenAI(base_url=envoy.url + "/v1", api_key="sk-demo-ops", max_retries=0)

    reply = team_a.chat.completions.create(model="gpt-4o",
                                           messages=[{"role": "user", "content": "Hello"}])
    assert reply.choices[0].message.content.endswith("You said: Hello")
    assert reply.model == "gpt-4o-2024-08-06"

    stream = ops.chat.completions.create(model="gpt-4o-mini", stream=True,
                                         stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "Hi"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("You said: Hi")
    assert chunks[-1].usage.total_tokens > 0
    # As on Azure: a first chunk with only prompt_filter_results, then the role.
    assert chunks[0].choices == []
    first = next(c for c in chunks if c.choices)
    assert first.choices[0].delta.role == "assistant"

    legacy = ops.completions.create(model="gpt-4o", prompt="Say ok")
    assert legacy.choices[0].text.endswith("You said: Say ok")
    # The SDK asks for base64 by default and decodes it; floats when asked.
    embedding = ops.embeddings.create(model="text-embedding-3-small", input="x")
    floats = ops.embeddings.create(model="text-embedding-3-small", input="x",
                                   encoding_format="float")
    assert len(embedding.data[0].embedding) == 16
    assert embedding.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    image = ops.images.generate(model="dall-e-3", prompt="a lighthouse")
    assert image.data[0].b64_json
    edit = ops.images.edit(model="gpt-image-1", prompt="add a hat",
                           image=("in.png", b"\x89PNG\r\n\x1a\n" + bytes(1000), "image/png"))
    assert edit.data[0].b64_json
    transcript = ops.audio.transcriptions.create(model="whisper-1",
                                                 file=("a.mp3", bytes(range(256)) * 40, "audio/mpeg"))
    assert transcript.text == "Stand-in transcript of 10240 bytes of audio."
    # The README's example, with the sample that ships.
    with open(ROOT / "envoy" / "speech.wav", "rb") as sample:
        transcript = ops.audio.transcriptions.create(model="whisper-1", file=sample)
    size = (ROOT / "envoy" / "speech.wav").stat().st_size
    assert transcript.text == f"Stand-in transcript of {size} bytes of audio."
    translation = ops.audio.translations.create(model="whisper-1",
                                                file=("a.mp3", bytes(300), "audio/mpeg"))
    assert "300 bytes" in translation.text
    speech = ops.audio.speech.create(model="tts-1", voice="alloy", input="Hi")
    assert speech.content.startswith(b"RIFF")
    response = ops.responses.create(model="gpt-4o", input="Hello")
    assert response.output_text.endswith("You said: Hello")
    assert ops.responses.retrieve(response.id).id == response.id
    items = ops.responses.input_items.list(response.id)
    assert items.data[0].content[0].text == "Hello"
    with pytest.raises(openai.BadRequestError):
        ops.responses.cancel(response.id)  # only background responses can be
    background = ops.responses.create(model="gpt-4o", input="Later", background=True)
    assert ops.responses.cancel(background.id).status == "cancelled"
    events = list(ops.responses.create(model="gpt-4o", input="Stream it", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed.endswith("You said: Stream it")
    assert events[-1].response.usage.total_tokens > 0
    assert events[-1].response.output_text == streamed
    ops.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        ops.responses.retrieve(response.id)
    v1 = ops.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "v1"}])
    assert v1.choices[0].message.content.endswith("You said: v1")
    assert [m.id for m in team_a.models.list()] == ["gpt-4o"]

    azure = openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="sk-demo-team-a",
                               api_version="2024-06-01", max_retries=0)
    reply = azure.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "az"}])
    assert reply.choices[0].message.content.endswith("You said: az")

    # A multipart upload streamed without content-length (chunked).
    boundary = "demo-boundary"
    parts = [f'--{boundary}\r\ncontent-disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'.encode(),
             f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n'
             f'content-type: audio/wav\r\n\r\n'.encode(), bytes(5000), f"\r\n--{boundary}--\r\n".encode()]
    reply = httpx.post(envoy.url + "/v1/audio/transcriptions", content=iter(parts), timeout=10,
                       headers={"authorization": "Bearer sk-demo-ops",
                                "content-type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == "Stand-in transcript of 5000 bytes of audio."

    with pytest.raises(openai.NotFoundError):
        team_a.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=envoy.url + "/v1", api_key="sk-wrong", max_retries=0) \
            .chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_readme_commands_are_the_real_ones():
    """The README's first two commands are the demo and the test runner, and
    its curl uses the demo's key, model and port."""
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "envoy/demo.sh" in first_block and "tests/run.sh" in first_block
    assert "Authorization: Bearer sk-demo-team-a" in readme
    demo = yaml.safe_load((ROOT / "envoy" / "demo.yaml").read_text())
    assert demo["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 10000
    assert "http://127.0.0.1:10000/v1/chat/completions" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tests/run.sh" in ci


def test_the_audio_sample_is_what_its_script_writes(tmp_path):
    out = tmp_path / "speech.wav"
    subprocess.run([sys.executable, str(ROOT / "envoy" / "make_speech_wav.py"), str(out)],
                   check=True, capture_output=True)
    shipped = (ROOT / "envoy" / "speech.wav").read_bytes()
    assert out.read_bytes() == shipped
    assert shipped[:4] == b"RIFF" and len(shipped) < 20_000


def run_demo(env, timeout=180):
    """envoy/demo.sh in its own process group; returns (process, ready line
    or None, output so far). Reads its output until it says it is ready or exits."""
    process = subprocess.Popen([str(ROOT / "envoy" / "demo.sh")], cwd=ROOT, text=True,
                               env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break  # exited
        lines.append(line)
        if "ready on" in line:
            return process, line, "".join(lines)
    return process, None, "".join(lines)


def stop_demo(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_demo_script_uses_the_ports_given_and_says_ready_when_it_is():
    process, ready, out = run_demo({"GATEWAY_PORT": "0", "STANDIN_PORT": "0", "ADMIN_PORT": "0"})
    try:
        assert ready, out + process.stderr.read() if process.poll() is not None else out
        url = re.search(r"ready on (http://127\.0\.0\.1:\d+)", ready).group(1)
        standin = int(re.search(r"stand-in on 127\.0\.0\.1:(\d+)", ready).group(1))
        assert url != "http://127.0.0.1:10000" and standin != 10001
        # Ready means ready: the first request after the message succeeds.
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-demo-team-a", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content.endswith("You said: Hi")
    finally:
        stop_demo(process)
    # Stopping it stops the stand-in too.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", standin)) != 0


def test_demo_script_refuses_to_start_when_the_stand_in_cannot_bind():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, ready, out = run_demo({"GATEWAY_PORT": "0", "STANDIN_PORT": str(port), "ADMIN_PORT": "0"})
        try:
            assert ready is None, out
            assert process.wait(timeout=30) == 1
            err = process.stderr.read()
            assert f"cannot listen on 127.0.0.1:{port}" in err, err
            assert "STANDIN_PORT" in err, err
        finally:
            stop_demo(process)


def test_pools_example_serves_and_steps_around_unreachable_targets(envoy_factory, tmp_path):
    """Started as shipped (no network here, so no Azure host resolves): every
    target of the pool fails in turn, and the caller gets the gateway's 429
    with Retry-After rather than a hang or Envoy's plain 503."""
    envoy = envoy_factory(local_copy(ROOT / "envoy" / "pools.yaml", tmp_path),
                          env=EXAMPLE_ENV).start()
    response = httpx.post(envoy.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                          headers={"authorization": "Bearer replace-me-team-a-key"}, timeout=20)
    error = assert_openai_error(response, 429, "rate_limit_exceeded")
    assert "gpt-4o" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert "panicked" not in envoy.log()


def test_a_reloaded_configuration_takes_over_on_every_worker(envoy_factory, west, east, tmp_path):
    """The listener comes from a watched LDS file, as a control plane would
    push it. Each replacement carries a new filter configuration (here the
    deployment behind `gpt-4o-mini`); every request from then on uses it,
    with no restart, no error and nothing left of the old one in what the
    upstream receives. (The native module also lets the worker state of
    destroyed ones go at a newer one's first stream on each worker.)"""
    from conftest import TEAM_A_KEY, WEST_KEY

    def generation(deployment):
        config = gateway_config(west.port, east.port)
        config["models"]["gpt-4o-mini"]["deployment"] = deployment
        boot = bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                         [cluster("azure_west", west.port), cluster("azure_east", east.port)])
        listener = boot["static_resources"].pop("listeners")[0]
        listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
        return boot, {"resources": [listener]}

    watched = tmp_path / "lds"
    watched.mkdir()
    lds = watched / "listeners.json"

    def publish(resources):
        # A rename into the watched directory: Envoy never reads half a file.
        staged = tmp_path / "staged.json"
        staged.write_text(json.dumps(resources))
        os.rename(staged, lds)

    boot, resources = generation("mini-1")
    publish(resources)
    boot["node"] = {"id": "gateway-1", "cluster": "gateway"}  # xDS needs them
    boot["dynamic_resources"] = {"lds_config": {
        "resource_api_version": "V3",
        "path_config_source": {"path": str(lds), "watched_directory": {"path": str(watched)}}}}
    envoy = envoy_factory(boot, env={"AZURE_WEST_KEY": WEST_KEY})
    # A replaced filter chain is destroyed once drained: in 1 s, not 600.
    envoy.args += ["--drain-time-s", "1"]
    envoy.start()

    def deployment_used():
        response = httpx.post(envoy.url + "/v1/chat/completions", timeout=10,
                              headers={"authorization": f"Bearer {TEAM_A_KEY}"},
                              json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 200, response.text
        return east.received[-1].path.split("/")[3]

    assert deployment_used() == "mini-1"
    for n in range(2, 6):
        publish(generation(f"mini-{n}")[1])
        deadline = time.monotonic() + 15
        while (used := deployment_used()) != f"mini-{n}":
            assert used == f"mini-{n - 1}", used
            assert time.monotonic() < deadline, f"generation {n} never took over"
            time.sleep(0.05)
        # Every worker (new connections land on either) has the new one.
        assert {deployment_used() for _ in range(12)} == {f"mini-{n}"}
        time.sleep(1.2)  # the previous generation drained and destroyed
    stats = envoy.stats("listener_manager.lds")
    assert int(stats["listener_manager.lds.update_success"]) >= 5, stats
    assert int(stats.get("listener_manager.lds.update_rejected", 0)) == 0, stats
    log = envoy.log()
    assert "panicked" not in log and "critical" not in log.lower(), log[-3000:]
    if NATIVE:
        assert "replaced configuration(s) released" in log
