"""The command-line tool against the real filter: a key made by `new-key`
authenticates in Envoy, and `check` refuses what Envoy refuses."""

import json
import subprocess

import httpx
import pytest
from conftest import gateway_config
from harness import ROOT, Envoy, bootstrap, cluster, validate, wasm_filter

CLI = ROOT / "target" / "debug" / "azure-openai-filter"


@pytest.fixture(scope="module")
def cli():
    if not CLI.exists():
        subprocess.run(["cargo", "build", "--locked", "--bin", "azure-openai-filter"], cwd=ROOT,
                       check=True, capture_output=True, timeout=600)

    def run(*args, stdin=None, env=None):
        return subprocess.run([str(CLI), *args], input=stdin, capture_output=True, text=True,
                              timeout=60, env=env or {})
    return run


def test_a_new_key_authenticates_through_the_filter(cli, west, east):
    made = json.loads(cli("new-key", "--json", "--name", "new-team", "--models", "gpt-4o").stdout)
    config = gateway_config(west.port, east.port)
    config["callers"].append(made["caller"])
    envoy = Envoy(bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                            [cluster("azure_west", west.port), cluster("azure_east", east.port)]),
                  env={"AZURE_WEST_KEY": "k"}).start()
    try:
        west.reset()
        reply = httpx.post(envoy.url + "/v1/chat/completions", timeout=10,
                           headers={"authorization": f"Bearer {made['key']}"},
                           json={"model": "gpt-4o", "messages": []})
        assert reply.status_code == 200, reply.text
        assert west.only().path.startswith("/openai/deployments/gpt4o-prod/")
        reply = httpx.post(envoy.url + "/v1/chat/completions", timeout=10,
                           headers={"authorization": f"Bearer {made['key']}x"},
                           json={"model": "gpt-4o", "messages": []})
        assert reply.status_code == 401
    finally:
        envoy.cleanup()
    hashed = cli("hash-key", stdin=made["key"] + "\n")
    assert hashed.stdout.strip() == made["key_sha256"]


def test_check_and_envoy_refuse_alike(cli, tmp_path):
    config = gateway_config(1, 2)
    config["models"]["gpt-4o"]["upstream"] = "north"
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap([wasm_filter(config, env_keys=["AZURE_WEST_KEY"])],
                                         [cluster("azure_west", 1), cluster("azure_east", 2)])))
    code, output = validate(path, env={"AZURE_WEST_KEY": "k"})
    assert code != 0
    refusal = "models.gpt-4o.upstream: unknown upstream `north`"
    assert f"configuration refused: {refusal}" in output
    checked = cli("check", str(path), env={"AZURE_WEST_KEY": "k"})
    assert checked.returncode == 1
    assert f"configuration refused: {refusal}" in checked.stdout
