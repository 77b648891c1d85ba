"""Every manifest under deploy/ against its resource's published schema,
where a package registry has one: the kubernetes-models npm packages carry
JSON schemas generated from the Kubernetes API, Istio's CRDs (Istio 1.29)
and the Gateway API CRDs. Envoy Gateway's own CRDs (EnvoyProxy,
EnvoyExtensionPolicy, EnvoyPatchPolicy) have no such package: those objects
are checked only by test_deploy.py (the Envoy configuration they produce)."""

import json
import shutil
import subprocess

import pytest
import yaml
from harness import ROOT

SCHEMAS = ROOT / "tests" / "schemas"
TOOLS = ROOT / "target" / "tools" / "k8s-schemas"
# Objects whose schema no registry package provides.
NO_SCHEMA = {"EnvoyProxy", "EnvoyExtensionPolicy", "EnvoyPatchPolicy"}


@pytest.fixture(scope="module")
def validator():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (the README's requirements)")
    stamp = TOOLS / "package.json"
    # An install cut short leaves the package.json without the packages.
    installed = (TOOLS / "node_modules" / "kubernetes-models").is_dir()
    if not installed or not stamp.exists() or \
            stamp.read_text() != (SCHEMAS / "package.json").read_text():
        TOOLS.mkdir(parents=True, exist_ok=True)
        shutil.copy(SCHEMAS / "package.json", stamp)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(TOOLS)],
                       check=True, timeout=300)
    shutil.copy(SCHEMAS / "validate.mjs", TOOLS / "validate.mjs")

    def validate(objects):
        result = subprocess.run(["node", str(TOOLS / "validate.mjs")], input=json.dumps(objects),
                                capture_output=True, text=True, timeout=120, check=True)
        return [json.loads(line) for line in result.stdout.splitlines()]
    return validate


MANIFESTS = sorted((ROOT / "deploy").rglob("*.yaml"))


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[str(p.relative_to(ROOT)) for p in MANIFESTS])
def test_manifest_matches_published_schemas(validator, manifest):
    objects = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    results = validator(objects)
    assert len(results) == len(objects)
    for result in results:
        if result["kind"] in NO_SCHEMA:
            assert result["schema"] is None, result
            continue
        assert result["schema"], f"no schema found for {result}"
        assert result["errors"] is None, result


def test_the_schemas_catch_mistakes(validator):
    """A broken EnvoyFilter, Gateway API route and Deployment are refused."""
    envoy_filter = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                    "metadata": {"name": "x"},
                    "spec": {"configPatches": [{"applyTo": "HTTP_FILTERS", "patch": {"operation": "ADD"}}]}}
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"},
             "spec": {"rules": [{"matches": [{"path": {"type": "Prefix", "value": "/"}}]}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"selector": {}, "template": {"spec": {"containers": [{"image": "x"}]}}}}
    results = validator([envoy_filter, route, deployment])
    assert all(r["schema"] and r["errors"] for r in results), results
