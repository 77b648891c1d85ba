"""Bare Envoy (native route rewrite + header swap) against Envoy with the
filter, in one run: same small chat request, same upstream, over loopback.
Two cases: a plain chat completion ("chat"), and a streamed one ("stream":
an SSE answer of 20 events, each flushed, from bench/sse-upstream).

A third set-up, bare Envoy plus a Wasm filter that does nothing
(bench/noop-filter), shows what any Wasm filter costs before doing work.
Builds of the native module (`--native NAME=PATH`, native-build.sh) run the
same filter as an Envoy dynamic module, without the V8 boundary.

Two modes (see MODES): "pinned", where the Envoy under test has a core to
itself and saturates it, and "shared", where everything shares both cores.
The upstream is an Envoy answering with a fixed Azure-shaped body. Rounds
alternate between the two set-ups so drift on this shared machine hits both.
Reported: requests/s (median of rounds), Envoy CPU time per request (from
/proc, user + system, all threads), and filter/bare ratios.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import (Envoy, bootstrap, cluster, native_filter, sha256_hex,  # noqa: E402
                     wasm_filter)

CALLER_KEY = "sk-bench-caller-key"
UPSTREAM_KEY = "bench-upstream-key"
AZURE_PATH = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
AZURE_HOST = "acme-west.openai.azure.com"
REPLY = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello there, how are you?"}}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}})
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def listener(name, routes, http_filters=()):
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                    "routes": routes}]},
                "http_filters": list(http_filters) + [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                              "http.router.v3.Router"}}],
            }}]}],
    }


def admin():
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}


def upstream_config():
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {
        "inline_string": REPLY}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}}]}
    # The buffer filter reads the whole request before the direct response;
    # answering earlier would make Envoy close every connection.
    buffer = {"name": "envoy.filters.http.buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 1048576}}
    return {"static_resources": {"listeners": [listener("upstream", [route], [buffer])]},
            "admin": admin()}


def bare_config(upstream_port):
    """What Envoy does natively: fixed rewrite to one deployment, key swap."""
    route = {
        "match": {"path": "/v1/chat/completions"},
        "route": {
            "cluster": "azure_west", "timeout": "0s",
            "regex_rewrite": {"pattern": {"regex": "^.*$"}, "substitution": AZURE_PATH},
            "host_rewrite_literal": AZURE_HOST,
        },
        "request_headers_to_remove": ["authorization"],
        "request_headers_to_add": [{"header": {"key": "api-key", "value": UPSTREAM_KEY},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }
    return {"static_resources": {"listeners": [listener("gateway", [route])],
                                 "clusters": [cluster("azure_west", upstream_port)]},
            "admin": admin()}


NOOP_WASM = ROOT / "bench" / "noop-filter" / "target" / "wasm32-wasip1" / "release" / "noop_filter.wasm"


def noop_config(upstream_port):
    """Bare Envoy plus a Wasm filter that does nothing: what any Wasm filter
    costs before it does any work."""
    config = bare_config(upstream_port)
    noop = wasm_filter({})
    noop["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(NOOP_WASM)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["http_filters"].insert(0, noop)
    return config


# A build named NAME+limits runs with the bench caller held to limits that
# never bite: what admission and the x-ratelimit-* headers cost.
LIMITED = "+limits"
NO_BITE = {"requests_per_minute": 10**12, "tokens_per_minute": 10**12}


def gateway_config(limited=False):
    return {
        "upstreams": {"west": {"endpoint": f"https://{AZURE_HOST}", "cluster": "azure_west",
                               "auth": {"api_key": {"env": "BENCH_UPSTREAM_KEY"}}}},
        "models": {"gpt-4o": {"upstream": "west", "deployment": "gpt4o-prod"}},
        "callers": [{"name": f"caller-{i}", "key_sha256": sha256_hex(f"{CALLER_KEY}-{i}"),
                     "models": ["gpt-4o"]} for i in range(9)]
                   + [{"name": "bench", "key_sha256": sha256_hex(CALLER_KEY), "models": ["gpt-4o"],
                       **({"limits": NO_BITE} if limited else {})}],
    }


def filter_config(upstream_port, wasm, limited=False):
    entry = wasm_filter(gateway_config(limited), env_values={"BENCH_UPSTREAM_KEY": UPSTREAM_KEY})
    entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    return bootstrap([entry], [cluster("azure_west", upstream_port)]), {}


def native_config(upstream_port, module, limited=False):
    """The native module at `module` (lib<name>.so): Envoy finds it by name
    in ENVOY_DYNAMIC_MODULES_SEARCH_PATH; it reads the upstream key from
    Envoy's environment."""
    module = Path(module).resolve()
    entry = native_filter(gateway_config(limited))
    name = module.name.removeprefix("lib").removesuffix(".so")
    entry["typed_config"]["dynamic_module_config"]["name"] = name
    env = {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module.parent),
           "BENCH_UPSTREAM_KEY": UPSTREAM_KEY}
    return bootstrap([entry], [cluster("azure_west", upstream_port)]), env


SSE_UPSTREAM = ROOT / "target" / "bench-sse-upstream"


class SseUpstream:
    """The Go stand-in that streams (bench/sse-upstream), pinned like the
    Envoy upstream."""

    def __init__(self, cpus):
        if not SSE_UPSTREAM.exists():
            subprocess.run(["go", "build", "-o", str(SSE_UPSTREAM), "."],
                           cwd=ROOT / "bench" / "sse-upstream", check=True)
        args = [str(SSE_UPSTREAM)]
        if cpus:
            args = ["taskset", "-c", cpus] + args
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline())

    def cleanup(self):
        self.process.terminate()
        self.process.wait()


def start(config, cpus, concurrency, env=None):
    envoy = Envoy(config, env=env, concurrency=concurrency, log_level="warn",
                  component_log_level=None)
    if cpus:
        envoy.args = ["taskset", "-c", cpus] + envoy.args
    return envoy.start()


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


WRK_CPUS = []


CASE = {"stream": False}


def wrk(url, seconds, connections):
    env = {**os.environ, "BENCH_KEY": CALLER_KEY}
    if CASE["stream"]:
        env["BENCH_STREAM"] = "1"
    out = subprocess.run(WRK_CPUS + ["wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "-s", str(ROOT / "bench" / "post.lua"), url],
                         env=env, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    return requests, out


def measure(envoy, seconds, connections):
    before = cpu_seconds(envoy.process.pid)
    started = time.monotonic()
    requests, _ = wrk(envoy.url + "/v1/chat/completions", seconds, connections)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(envoy.process.pid) - before
    return {"rps": requests / elapsed, "cpu_us_per_request": cpu / requests * 1e6,
            "requests": requests}


def check(envoy):
    response = httpx.post(envoy.url + "/v1/chat/completions", timeout=10,
                          headers={"authorization": f"Bearer {CALLER_KEY}"},
                          json={"model": "gpt-4o", "messages": [], "stream": CASE["stream"]})
    assert response.status_code == 200, response.text
    if CASE["stream"]:
        assert response.text.endswith("data: [DONE]\n\n") and "usage" not in response.text
    else:
        assert response.json()["id"] == "chatcmpl-1", response.text


MODES = {
    # Envoy alone on CPU 0 with one worker; wrk and the upstream on CPU 1.
    # Envoy saturates first, so throughput follows its CPU cost per request.
    "pinned": {"under_test": "0", "helpers": "1", "workers": 1},
    # Nothing pinned; Envoy runs two workers and shares both cores with wrk
    # and the upstream: the throughput of the whole machine.
    "shared": {"under_test": None, "helpers": None, "workers": 2},
}


def run_mode(mode, args):
    global WRK_CPUS
    settings = MODES[mode]
    WRK_CPUS = ["taskset", "-c", settings["helpers"]] if settings["helpers"] else []
    if CASE["stream"]:
        upstream = SseUpstream(settings["helpers"])
    else:
        upstream = start(upstream_config(), settings["helpers"], 1)
    setups = {}
    try:
        makers = [("bare", lambda port: (bare_config(port), {})),
                  ("noop-wasm", lambda port: (noop_config(port), {}))]
        makers += [(name, lambda port, wasm=wasm, name=name:
                    filter_config(port, wasm, name.endswith(LIMITED)))
                   for name, wasm in args.modules]
        makers += [(name, lambda port, module=module, name=name:
                    native_config(port, module, name.endswith(LIMITED)))
                   for name, module in args.natives]
        for name, make in makers:
            config, env = make(upstream.port)
            setups[name] = start(config, settings["under_test"], settings["workers"], env)
        for envoy in setups.values():
            check(envoy)
            wrk(envoy.url + "/v1/chat/completions", 2, args.connections)  # warm-up
        rounds = {name: [] for name in setups}
        for r in range(args.rounds):
            for name, envoy in setups.items():
                result = measure(envoy, args.seconds, args.connections)
                rounds[name].append(result)
                print(f"{args.case} {mode} round {r + 1} {name:6}: {result['rps']:9.0f} req/s "
                      f"{result['cpu_us_per_request']:6.1f} us CPU/request", flush=True)
    finally:
        for envoy in [upstream, *setups.values()]:
            envoy.cleanup()
    summary = {}
    for name, results in rounds.items():
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in results),
            "cpu_us_per_request": sum(r["cpu_us_per_request"] * r["requests"] for r in results)
            / sum(r["requests"] for r in results),
        }
    bare = summary["bare"]
    return {
        "rounds": rounds,
        "summary": summary,
        "throughput_ratio": {name: summary[name]["rps"] / bare["rps"] for name in summary},
        "cpu_per_request_ratio": {name: summary[name]["cpu_us_per_request"]
                                  / bare["cpu_us_per_request"] for name in summary},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--modes", default="pinned,shared",
                        help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--cases", default="chat,stream",
                        help="comma-separated: chat (JSON answer), stream (SSE answer)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--module", action="append", default=[], metavar="NAME=PATH",
                        help="a build of the filter to measure (repeat to compare builds in one "
                             "run; a NAME ending in +limits holds the caller to limits that never "
                             "bite); default: filter=target/azure_openai_filter.wasm")
    parser.add_argument("--native", action="append", default=[], metavar="NAME=PATH",
                        help="a build of the native module (lib<name>.so, native-build.sh) to "
                             "measure beside the Wasm builds (repeatable; +limits as above), e.g. "
                             "native=target/native/libazure_openai_filter.so")
    args = parser.parse_args()
    args.modules = [tuple(m.split("=", 1)) for m in args.module] or [
        ("filter", str(ROOT / "target" / "azure_openai_filter.wasm"))]
    args.natives = [tuple(m.split("=", 1)) for m in args.native]

    results = {}
    for case in args.cases.split(","):
        CASE["stream"] = case == "stream"
        args.case = case
        for mode in args.modes.split(","):
            results[f"{case} {mode}"] = run_mode(mode, args)
    report = {"modes": results, "settings": vars(args),
              "module_bytes": {name: Path(path).stat().st_size
                               for name, path in args.modules + args.natives}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print()
    print("| case, mode | set-up | requests/s (median) | Envoy CPU per request | CPU/request vs bare |")
    print("|---|---|---|---|---|")
    for mode, result in results.items():
        for name, s in result["summary"].items():
            ratio = result["cpu_per_request_ratio"][name]
            print(f"| {mode} | {name} | {s['rps']:.0f} | {s['cpu_us_per_request']:.1f} us | "
                  f"x{ratio:.3f} |")
    for name, size in report["module_bytes"].items():
        print(f"module {name}: {size} bytes")


if __name__ == "__main__":
    main()
