import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import (MODULE, NATIVE, Envoy, RecordingUpstream, bootstrap,  # noqa: E402
                     cluster, sha256_hex, wasm_filter)

TEAM_A_KEY = "sk-team-a-0123456789"
OPS_KEY = "sk-ops-9876543210"
WEST_KEY = "west-upstream-secret-1"
EAST_KEY = "east-upstream-secret-2"
BODY_LIMIT = 2 * 1024 * 1024


def pytest_sessionstart(session):
    if not MODULE.exists():
        build = "./native-build.sh" if NATIVE else "./wasm-build.sh"
        pytest.exit(f"{MODULE} is missing: run {build} (tests/run.sh does)", returncode=2)


def gateway_config(west_port, east_port):
    return {
        "max_request_body_bytes": BODY_LIMIT,
        "upstreams": {
            "west": {
                "endpoint": "https://acme-west.openai.azure.com",
                "cluster": "azure_west",
                "api_version": "2024-10-21",
                "auth": {"api_key": {"env": "AZURE_WEST_KEY"}},
            },
            "east": {
                "endpoint": f"http://127.0.0.1:{east_port}",
                "cluster": "azure_east",
                "api_version": "2025-04-01-preview",
                "auth": {"api_key": {"value": EAST_KEY}},
            },
        },
        "models": {
            "gpt-4o": {"upstream": "west", "deployment": "gpt4o-prod"},
            "gpt-4o-mini": {"upstream": "east", "deployment": "mini-prod"},
            "text-embedding-3-small": {"upstream": "west", "deployment": "embed-prod"},
            "gpt-35-turbo-instruct": {"upstream": "west", "deployment": "instruct-prod"},
        },
        "callers": [
            {"name": "team-a", "key_sha256": sha256_hex(TEAM_A_KEY),
             "models": ["gpt-4o", "gpt-4o-mini"]},
            {"name": "ops", "key_sha256": sha256_hex(OPS_KEY), "models": ["*"]},
        ],
    }


@pytest.fixture(scope="session")
def west():
    upstream = RecordingUpstream("west")
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def east():
    upstream = RecordingUpstream("east")
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def gateway(west, east):
    """Envoy (2 workers) with the filter in front of the two recording upstreams."""
    config = bootstrap(
        [wasm_filter(gateway_config(west.port, east.port), env_keys=["AZURE_WEST_KEY"])],
        [cluster("azure_west", west.port), cluster("azure_east", east.port)],
    )
    envoy = Envoy(config, env={"AZURE_WEST_KEY": WEST_KEY}).start()
    yield envoy
    envoy.cleanup()


@pytest.fixture(autouse=True)
def fresh_upstreams(request):
    """Each test starts with empty upstream records and default replies."""
    for name in ("west", "east"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()
    yield


@pytest.fixture
def envoy_factory():
    """Starts extra Envoys for one test and stops them afterwards."""
    started = []

    def make(config, **kwargs):
        envoy = Envoy(config, **kwargs)
        started.append(envoy)
        return envoy

    yield make
    for envoy in started:
        envoy.cleanup()


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
