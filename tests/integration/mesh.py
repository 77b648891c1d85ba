"""What a mesh would hand Envoy, built from the manifests under deploy/.

There is no Kubernetes here, so these helpers do the one part of Istio's and
Envoy Gateway's work the tests need: start from the listener, routes and
filters the control plane generates (names and shapes as their sources and
docs give them), apply the manifest's patches the way the control plane
applies them, and return an Envoy bootstrap plus the environment the pod
would have. Everything the manifests carry (filter settings, routes,
clusters, connection manager settings such as local_reply_config, stats
tags, secrets-to-environment wiring) goes to Envoy as written; what is emulated is said at each step.
"""

import copy
import json
from pathlib import Path

import jsonpatch
import yaml
from jsonpath_ng.ext import parse as jsonpath

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager")
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def documents(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["kind"] for d in docs])
    return found[0]


def pod_env(docs, containers):
    """The environment variables the containers get from secretKeyRef and
    value entries, resolved against the Secrets in the same manifests."""
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    env = {}
    for container in containers:
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def merge(target, patch):
    """Protobuf MergeFrom on JSON: messages merge field by field, repeated
    fields append, scalars replace (what Istio's MERGE and Envoy's
    --config-yaml do)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key].extend(copy.deepcopy(value))
        else:
            target[key] = copy.deepcopy(value)
    return target


def listener(name, hcm):
    return {"name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def base_bootstrap(listeners, clusters, stats_config=None):
    bootstrap = {
        # Istio and Envoy Gateway always name the node; ECDS requires it.
        "node": {"id": "test-node", "cluster": "test-cluster"},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }
    if stats_config:
        bootstrap["stats_config"] = stats_config
    return bootstrap


def static_cluster(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def local_module(wasm_typed_config, wasm_path):
    """What the Istio agent (ECDS) or Envoy Gateway does with the module: the
    remote (OCI) source becomes a local file."""
    config = copy.deepcopy(wasm_typed_config)
    config["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm_path)}}
    return config


# ------------------------------------------------------------------ Istio

def istio_stats_config(pod_annotations):
    """Istio's bootstrap stats_config (tools/packaging/common/envoy_bootstrap.json):
    no default tags, and only its own stats plus proxyStatsMatcher's
    inclusionPrefixes reach /stats."""
    proxy_config = yaml.safe_load(pod_annotations.get("proxy.istio.io/config", "{}")) or {}
    prefixes = proxy_config.get("proxyStatsMatcher", {}).get("inclusionPrefixes", [])
    patterns = [{"prefix": "reporter="}] + [{"prefix": p} for p in prefixes] + [
        {"prefix": "component"}, {"prefix": "istio"}]
    return {"use_all_default_tags": False,
            "stats_tags": [{"tag_name": "response_code", "regex": "_rq(_(\\d{3}))$"}],
            "stats_matcher": {"inclusion_list": {"patterns": patterns}}}


def istio_bootstrap(manifest, wasm_path, workdir, context, port, route_config, listener_name):
    """Applies the manifest's EnvoyFilter to an Istio-shaped listener and
    returns (bootstrap, envoy args, pod environment)."""
    docs = documents(manifest)
    envoy_filter = one(docs, "EnvoyFilter")
    hcm = {"@type": HCM_TYPE, "stat_prefix": listener_name, "codec_type": "AUTO",
           "route_config": route_config, "http_filters": [copy.deepcopy(ROUTER)]}
    clusters = []
    ecds = []
    for patch in envoy_filter["spec"]["configPatches"]:
        match, value = patch["match"], copy.deepcopy(patch["patch"]["value"])
        operation = patch["patch"]["operation"]
        assert match["context"] == context, match
        where = (patch["applyTo"], operation)
        if where == ("EXTENSION_CONFIG", "ADD"):
            # The agent pulls the image and delivers the extension by ECDS.
            ecds.append({"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                         "name": value["name"],
                         "typed_config": local_module(value["typed_config"], wasm_path)})
        elif where == ("HTTP_FILTER", "INSERT_BEFORE"):
            assert match["listener"]["portNumber"] == port
            assert match["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
            # ADS is Istio's; here the same ECDS resource comes from a file.
            source = value["config_discovery"]["config_source"]
            assert source.pop("ads") == {}
            source["path_config_source"] = {"path": str(workdir / "ecds.json")}
            router = [f["name"] for f in hcm["http_filters"]].index("envoy.filters.http.router")
            hcm["http_filters"].insert(router, value)
        elif where == ("VIRTUAL_HOST", "ADD"):
            assert match["routeConfiguration"]["portNumber"] == port
            route_config["virtual_hosts"].append(value)
        elif where == ("HTTP_ROUTE", "INSERT_FIRST"):
            assert match["routeConfiguration"]["portNumber"] == port
            vhost = [v for v in route_config["virtual_hosts"]
                     if v["name"] == match["routeConfiguration"]["vhost"]["name"]]
            assert len(vhost) == 1, match
            vhost[0]["routes"].insert(0, value)
        elif where == ("NETWORK_FILTER", "MERGE"):
            assert value["name"] == "envoy.filters.network.http_connection_manager"
            merge(hcm, value["typed_config"])
        elif where == ("CLUSTER", "ADD"):
            clusters.append(value)
        else:
            raise AssertionError(f"patch not emulated: {where}")
    (workdir / "ecds.json").write_text(json.dumps({"resources": ecds}))

    pods = [d for d in docs if d["kind"] == "Deployment"]
    template = pods[0]["spec"]["template"]
    annotations = template["metadata"].get("annotations", {})
    proxy = [c for c in template["spec"]["containers"] if c["name"] == "istio-proxy"]
    env = pod_env(docs, proxy)
    # sidecar.istio.io/bootstrapOverride: the agent passes the ConfigMap's
    # custom_bootstrap.json to Envoy with --config-yaml.
    args = []
    override = annotations.get("sidecar.istio.io/bootstrapOverride")
    if override:
        config_map = one(docs, "ConfigMap", override)
        args = ["--config-yaml", config_map["data"]["custom_bootstrap.json"]]
    bootstrap = base_bootstrap([listener(listener_name, hcm)], clusters,
                               istio_stats_config(annotations))
    return bootstrap, args, env


def istio_gateway(wasm_path, workdir):
    """deploy/istio/ingress-gateway.yaml on the gateway's 8080 listener, whose
    route configuration Istio generates with only its 404 virtual host when
    no VirtualService is bound."""
    route_config = {"name": "http.8080", "virtual_hosts": [
        {"name": "blackhole:8080", "domains": ["*"],
         "routes": [{"name": "block_all", "match": {"prefix": "/"},
                     "direct_response": {"status": 404}}]}]}
    return istio_bootstrap(DEPLOY / "istio" / "ingress-gateway.yaml", wasm_path, workdir,
                           "GATEWAY", 8080, route_config, "0.0.0.0_8080")


def istio_sidecar(wasm_path, workdir, passthrough_port):
    """deploy/istio/sidecar.yaml on the sidecar's outbound port-80 listener:
    a virtual host per port-80 service (here the manifest's azure-openai
    Service, with Istio's default route to its empty cluster) and the
    allow-any passthrough for everything else."""
    service = "azure-openai.my-app.svc.cluster.local"
    route_config = {"name": "80", "virtual_hosts": [
        {"name": f"{service}:80",
         "domains": [service, f"{service}:80", "azure-openai", "azure-openai:80",
                     "azure-openai.my-app", "azure-openai.my-app:80"],
         "routes": [{"name": "default", "match": {"prefix": "/"},
                     "route": {"cluster": f"outbound|80||{service}"}}]},
        {"name": "allow_any", "domains": ["*"],
         "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                     "route": {"cluster": "PassthroughCluster"}}]}]}
    bootstrap, args, env = istio_bootstrap(DEPLOY / "istio" / "sidecar.yaml", wasm_path, workdir,
                                           "SIDECAR_OUTBOUND", 80, route_config, "0.0.0.0_80")
    clusters = bootstrap["static_resources"]["clusters"]
    clusters.append({"name": f"outbound|80||{service}", "type": "STATIC", "connect_timeout": "1s",
                     "load_assignment": {"cluster_name": f"outbound|80||{service}"}})
    clusters.append(static_cluster("PassthroughCluster", passthrough_port))
    return bootstrap, args, env


# ----------------------------------------------------------- Envoy Gateway

def pointers(document, json_path, path):
    """Envoy Gateway's jsonPath + path: every node the JSONPath selects,
    as a JSON pointer, with `path` appended (internal/utils/jsonpatch)."""
    found = []
    if json_path.startswith("."):
        json_path = "$" + json_path  # ojg (Envoy Gateway's) allows the root to be implied
    for match in jsonpath(json_path).find(document):
        parts = []
        node = match
        while node is not None and node.path is not None:
            field = node.path
            if hasattr(field, "indices"):
                parts.append(str(field.indices[0]))
            elif hasattr(field, "fields"):
                parts.append(str(field.fields[0]))
            node = node.context
        pointer = "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in reversed(parts)
                          if p != "$")
        suffix = path if path.startswith("/") else "/" + path
        found.append(pointer + suffix)
    return found


def apply_envoy_patch_policy(policy, resources):
    """RFC 6902 patches, as Envoy Gateway applies them to its xDS output;
    `add` with an empty path adds a whole resource."""
    for patch in policy["spec"]["jsonPatches"]:
        operation = copy.deepcopy(patch["operation"])
        kind = patch["type"]
        if operation["op"] == "add" and operation.get("path") == "":
            resources.setdefault(kind, {})[operation["value"]["name"]] = operation["value"]
            continue
        target = resources[kind][patch["name"]]
        paths = ([operation.pop("path")] if "jsonPath" not in operation
                 else pointers(target, operation.pop("jsonPath"), operation.pop("path", "")))
        assert paths, patch
        ops = [dict(operation, path=p) for p in paths]
        resources[kind][patch["name"]] = jsonpatch.apply_patch(target, ops)
    return resources


def envoy_gateway(wasm_path):
    """deploy/envoy-gateway/azure-openai.yaml. The starting point is the xDS
    Envoy Gateway generates for this Gateway, HTTPRoute and
    EnvoyExtensionPolicy (internal/xds/translator: the HTTP listener's
    connection manager in default_filter_chain, the Wasm filter named after
    the policy and disabled except on the policy's routes, a route without
    backends answering 500); then the EnvoyPatchPolicy goes on top."""
    docs = documents(DEPLOY / "envoy-gateway" / "azure-openai.yaml")
    gateway = one(docs, "Gateway")
    route = one(docs, "HTTPRoute")
    extension = one(docs, "EnvoyExtensionPolicy")
    proxy = one(docs, "EnvoyProxy")
    ns = gateway["metadata"]["namespace"]
    listener_name = f"{ns}/{gateway['metadata']['name']}/{gateway['spec']['listeners'][0]['name']}"
    wasm = extension["spec"]["wasm"][0]
    filter_name = (f"envoy.filters.http.wasm/envoyextensionpolicy/{ns}/"
                   f"{extension['metadata']['name']}/wasm/0")
    vm_id = filter_name.removeprefix("envoy.filters.http.wasm/")
    wasm_filter = {"name": filter_name, "disabled": True, "typed_config": {
        "@type": WASM_TYPE,
        "config": {"name": wasm.get("name", vm_id), "root_id": wasm["rootID"],
                   "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                                 "code": {"local": {"filename": str(wasm_path)}}},
                   "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                     "value": json.dumps(wasm["config"], separators=(",", ":"))},
                   "fail_open": wasm.get("failOpen", False)}}}
    route_name = f"httproute/{ns}/{route['metadata']['name']}/rule/0/match/0/*"
    route_config = {"name": listener_name, "virtual_hosts": [{
        "name": f"{listener_name}/*", "domains": ["*"],
        "routes": [{"name": route_name, "match": {"prefix": "/"},
                    "direct_response": {"status": 500},
                    "typed_per_filter_config": {filter_name: {
                        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                        "config": {}}}}]}]}
    # Its connection manager always carries HTTP/2 options (listener.go,
    # http2ProtocolOptions: 100 streams, a 64 KiB stream and a 1 MiB
    # connection window unless a ClientTrafficPolicy says otherwise) and
    # refuses header names with underscores (ClientTrafficPolicy
    # headers.withUnderscoresAction, RejectRequest by default), and its
    # listener has a 32 KiB per_connection_buffer_limit_bytes.
    hcm = {"@type": HCM_TYPE, "stat_prefix": "http-10080", "codec_type": "AUTO",
           "rds": {"route_config_name": listener_name},
           "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
           "http2_protocol_options": {"max_concurrent_streams": 100,
                                      "initial_stream_window_size": 65536,
                                      "initial_connection_window_size": 1048576},
           "http_filters": [wasm_filter, copy.deepcopy(ROUTER)]}
    xds_listener = {"name": listener_name,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "per_connection_buffer_limit_bytes": 32768,
                    "default_filter_chain": {"filters": [
                        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}}
    resources = {"type.googleapis.com/envoy.config.listener.v3.Listener": {listener_name: xds_listener},
                 "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": {listener_name: route_config},
                 "type.googleapis.com/envoy.config.cluster.v3.Cluster": {}}
    apply_envoy_patch_policy(one(docs, "EnvoyPatchPolicy"), resources)

    # Envoy gets the route configuration over RDS from Envoy Gateway; inline here.
    out_listener = resources["type.googleapis.com/envoy.config.listener.v3.Listener"][listener_name]
    out_hcm = out_listener["default_filter_chain"]["filters"][0]["typed_config"]
    del out_hcm["rds"]
    out_hcm["route_config"] = resources["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"][listener_name]
    clusters = list(resources["type.googleapis.com/envoy.config.cluster.v3.Cluster"].values())
    bootstrap = base_bootstrap([out_listener], clusters)
    # EnvoyProxy bootstrap type Merge: merged into Envoy Gateway's bootstrap.
    merge(bootstrap, yaml.safe_load(proxy["spec"]["bootstrap"]["value"]))
    env = pod_env(docs, [proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]])
    return bootstrap, [], env
