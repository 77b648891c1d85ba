"""Real parts for integration tests: an Envoy running the built .wasm, and
upstream stand-ins that record exactly what they received.

Everything binds 127.0.0.1 port 0; Envoy reports its ports through the admin
API, and every process is stopped by the fixture that started it.
"""

import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# Another build can be tested (or benchmarked) by pointing this at it.
WASM = Path(os.environ.get("AZURE_OPENAI_FILTER_WASM", ROOT / "target" / "azure_openai_filter.wasm"))
ENVOY = Path(sys.prefix) / "bin" / "envoy"
# The tests' rate-limit service (tests/rls, Limitador's engine). tests/run.sh
# builds it outside the clone and names it in AZURE_OPENAI_TEST_RLS; a plain
# `cargo build --release --manifest-path tests/rls/Cargo.toml` is found too.
RLS = Path(os.environ.get("AZURE_OPENAI_TEST_RLS",
                          ROOT / "tests" / "rls" / "target" / "release" / "test-rls"))

# Which build the suite runs against: the .wasm (default) or the native
# dynamic module (native-build.sh), loaded as libazure_openai_filter.so from
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
BUILD = os.environ.get("AZURE_OPENAI_FILTER_BUILD", "wasm")
if BUILD not in ("wasm", "native"):
    raise SystemExit(f"AZURE_OPENAI_FILTER_BUILD must be wasm or native, not {BUILD!r}")
NATIVE = BUILD == "native"
NATIVE_MODULE = Path(os.environ.get("AZURE_OPENAI_FILTER_NATIVE",
                                    ROOT / "target" / "native" / "libazure_openai_filter.so"))
# The module under test, whichever build it is.
MODULE = NATIVE_MODULE if NATIVE else WASM
# Envoy's component logger for the filter's own log lines, and what marks
# them in Envoy's log.
FILTER_LOG_COMPONENT = "dynamic_modules" if NATIVE else "wasm"
FILTER_LOG_MARK = "][dynamic_modules]" if NATIVE else "wasm log"
# The namespace of the filter's stats in /stats (Prometheus drops it).
STATS_NAMESPACE = "dynamicmodulescustom" if NATIVE else "wasmcustom"
# What the native module reads as its environment: the Envoy process's. The
# Wasm VM gets `key_values` from its vm_config; the native filter entry
# cannot carry them, so they go into the environment of the Envoys started
# after (see Envoy below).
NATIVE_ENV = {}


def wasm_only(reason):
    """Marks a test that is about the Wasm build itself."""
    import pytest
    return pytest.mark.skipif(NATIVE, reason=f"Wasm build only: {reason}")


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- upstreams

@dataclass
class Received:
    """One request as the upstream saw it."""
    method: str
    path: str
    headers: list  # [(lower-case name, value)] in arrival order
    body: bytes
    at: float = 0.0  # time.monotonic() when it arrived

    def header(self, name):
        values = self.all(name)
        return values[0] if values else None

    def all(self, name):
        return [v for n, v in self.headers if n == name.lower()]


@dataclass
class Reply:
    """What an upstream answers: status, headers, and a body that is either
    bytes or a list of chunks sent `chunk_delay` seconds apart. `delay`
    waits before answering; `raw` is written as is and the connection closed
    (a response cut short)."""
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: object = b""
    chunk_delay: float = 0.0
    delay: float = 0.0
    raw: bytes = None


def azure_chat_reply(request):
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return Reply(200, {"content-type": "application/json"}, json.dumps(body).encode())


class QuietServer(ThreadingHTTPServer):
    """Does not print tracebacks for clients (Envoy) that hang up early."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class TlsServer(QuietServer):
    """QuietServer speaking TLS with `context`; the handshake happens in the
    handler thread, on first read."""

    def __init__(self, address, handler, context):
        self.context = context
        super().__init__(address, handler)

    def get_request(self):
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), address


class RecordingUpstream:
    """An HTTP/1.1 server that records every request and answers with
    `self.responder(request) -> Reply` (Azure-shaped chat JSON by default).
    With `ssl_context` it serves HTTPS."""

    def __init__(self, name="upstream", port=0, ssl_context=None):
        self.name = name
        self.received = []
        self.responder = azure_chat_reply
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                length = self.headers.get("content-length")
                if length is not None:
                    body = self.rfile.read(int(length))
                elif "chunked" in (self.headers.get("transfer-encoding") or ""):
                    body = read_chunked(self.rfile)
                else:
                    body = b""
                request = Received(self.command, self.path,
                                   [(k.lower(), v) for k, v in self.headers.items()], body,
                                   time.monotonic())
                with outer._lock:
                    outer.received.append(request)
                reply = outer.responder(request)
                self.send(reply)

            def send(self, reply):
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.raw is not None:
                    self.wfile.write(reply.raw)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    for one in value if isinstance(value, list) else [value]:
                        self.send_header(name, one)
                if isinstance(reply.body, (bytes, bytearray)):
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                    return
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in reply.body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(reply.chunk_delay)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            do_GET = do_POST = do_PUT = do_DELETE = handle_one

        if ssl_context is None:
            self.server = QuietServer(("127.0.0.1", port), Handler)
        else:
            self.server = TlsServer(("127.0.0.1", port), Handler, ssl_context)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self):
        with self._lock:
            self.received.clear()
        self.responder = azure_chat_reply

    def only(self):
        """The single request received (fails if there were more or none)."""
        assert len(self.received) == 1, f"{self.name} received {len(self.received)} requests"
        return self.received[0]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def terminate(process):
    """Stops a child process: SIGTERM, then SIGKILL after 10 s."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_chunked(stream):
    body = b""
    while True:
        size = int(stream.readline().split(b";")[0], 16)
        if size == 0:
            stream.readline()
            return body
        body += stream.read(size)
        stream.readline()


# ---------------------------------------------------------------- Envoy

def cluster(name, port):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def native_filter(filter_config, config_text=None):
    """The native dynamic-module HTTP filter entry, as the README documents it."""
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                     "DynamicModuleFilter",
            "dynamic_module_config": {"name": "azure_openai_filter"},
            "filter_name": "azure_openai",
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": config_text if config_text is not None else json.dumps(filter_config),
            },
        },
    }


def wasm_filter(filter_config, env_keys=(), env_values=None, config_text=None):
    """The filter entry of the build under test: the Wasm HTTP filter as the
    README documents it, or (AZURE_OPENAI_FILTER_BUILD=native) the native
    module's."""
    if NATIVE:
        NATIVE_ENV.update(env_values or {})
        return native_filter(filter_config, config_text)
    env = {}
    if env_keys:
        env["host_env_keys"] = list(env_keys)
    if env_values:
        env["key_values"] = dict(env_values)
    vm = {"vm_id": "azure_openai", "runtime": "envoy.wasm.runtime.v8",
          "code": {"local": {"filename": str(WASM)}}}
    if env:
        vm["environment_variables"] = env
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "azure_openai",
                "root_id": "azure_openai",
                "allow_on_headers_stop_iteration": True,
                "failure_policy": "FAIL_RELOAD",
                "vm_config": vm,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config_text if config_text is not None else json.dumps(filter_config),
                },
            },
        },
    }


# Response code details the filter gives every reply it makes itself
# (src/host/abi.rs): local_reply_config leaves replies with them alone.
FILTER_REPLY_DETAILS = "azure_openai_filter"

# Envoy's own replies, as OpenAI errors: (CEL condition, type, code, message),
# first match wins. The same list is in every envoy/*.yaml.
ENVOY_REPLIES = [
    ("response.code == 431", "invalid_request_error", "request_headers_too_large",
     "The request headers are larger than this gateway accepts. Send fewer or smaller headers."),
    ("response.code == 426", "invalid_request_error", "upgrade_required",
     "This gateway does not accept HTTP/1.0. Use HTTP/1.1 or HTTP/2."),
    ("response.code == 413", "invalid_request_error", "request_too_large",
     "The request body is larger than the gateway's Envoy buffer limit "
     "(per_connection_buffer_limit_bytes, or the HTTP/2 stream window). Send a smaller body."),
    ("response.code == 408", "invalid_request_error", "request_timeout",
     "The request timed out at the gateway (%RESPONSE_CODE_DETAILS%): nothing moved on it for "
     "longer than Envoy allows. Send the whole request promptly and retry."),
    ("response.code_details == 'route_not_found'", "invalid_request_error", "route_not_found",
     "No Envoy route matches this request: the gateway's route configuration does not cover it."),
    ("response.code_details == 'path_normalization_failed'", "invalid_request_error",
     "invalid_path",
     "The request path is not valid: it has a #fragment or cannot be normalized. "
     "Send the path without a fragment."),
    ("response.code == 400", "invalid_request_error", "malformed_request",
     "The request is not valid HTTP (%RESPONSE_CODE_DETAILS%): check the request line, the "
     "framing, and that header names and values hold no NUL, control or other invalid bytes."),
    ("response.code_details == 'http1.invalid_transfer_encoding'", "server_error",
     "unsupported_transfer_encoding",
     "The request's transfer-encoding is not supported. Send the body with content-length "
     "or transfer-encoding: chunked."),
    ("response.code_details == 'cluster_not_found'", "server_error", "cluster_not_found",
     "The gateway sends this request to the Envoy cluster `%REQ({cluster_header}):100%`, "
     "which this Envoy does not have. Add the cluster to Envoy, or fix the upstream's "
     "`cluster` in the filter configuration."),
    ("response.code_details == 'no_healthy_upstream'", "server_error", "no_healthy_upstream",
     "The upstream has no healthy endpoint in Envoy right now. Retry later."),
    ("response.code_details.startsWith('upstream_reset_before_response_started')",
     "server_error", "upstream_unavailable",
     "The gateway could not get a response from the upstream (%RESPONSE_CODE_DETAILS%). "
     "Retry later."),
    ("response.code == 504", "server_error", "upstream_timeout",
     "The upstream did not answer in time (%RESPONSE_CODE_DETAILS%). Retry later."),
    # Envoy's rate-limit filter: the caller is over a limit the fleet shares
    # (global limits), or the service could not be asked and
    # failure_mode_deny is on.
    ("response.code_details == 'request_rate_limited'", "requests", "rate_limit_exceeded",
     "This key is over a rate limit (requests or tokens per minute) that the gateway enforces "
     "across all its instances. Please retry after %RESP(retry-after)% seconds."),
    ("response.code_details == 'rate_limiter_error'", "server_error",
     "rate_limit_service_unavailable",
     "The gateway could not reach its rate-limit service, and refuses requests until it can. "
     "Retry later."),
    ("response.code >= 500", "server_error", "gateway_error",
     "The gateway could not complete the request (%RESPONSE_CODE_DETAILS%)."),
    ("response.code >= 400", "invalid_request_error", "invalid_request",
     "The gateway refused the request (%RESPONSE_CODE_DETAILS%)."),
]


def cel_filter(expression):
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                     "ExpressionFilter",
            "expression": expression}}}


def local_reply_config(cluster_header="x-azure-openai-cluster"):
    """HCM local_reply_config: Envoy's own replies become OpenAI error JSON;
    the filter's replies (first mapper, no rewrite) pass byte for byte."""
    mappers = [{"filter": cel_filter(f"response.code_details == '{FILTER_REPLY_DETAILS}'")}]
    for condition, kind, code, message in ENVOY_REPLIES:
        mappers.append({
            "filter": cel_filter(condition),
            "body_format_override": {"json_format": {"error": {
                "message": message.replace("{cluster_header}", cluster_header),
                "type": kind, "param": None, "code": code}}},
        })
    return {"mappers": mappers}


# The labels of the filter's metrics, carried in stat names as
# `_label=.=value;.;` (src/metrics.rs); the same rules are in every
# envoy/*.yaml.
METRIC_LABELS = ["caller", "model", "upstream", "deployment", "operation", "status", "type", "le",
                 "limit", "scope"]
STATS_TAGS = [{"tag_name": label, "regex": f"(_?{label}=\\.=(.*?);\\.;)"}
              for label in METRIC_LABELS]


# The access log of envoy/demo.yaml: a JSON line per request, with the
# filter's fields (filter state `wasm.azure_openai`, a JSON object) nested
# as they are, or null where the filter set none.
ACCESS_LOG_FORMAT = (
    '{"start":"%START_TIME%","method":"%REQ(:METHOD)%","path":"%PATH(NQ)%",'
    '"code":%RESPONSE_CODE%,"details":"%RESPONSE_CODE_DETAILS%","duration_ms":%DURATION%,'
    '"azure_openai":%CEL(\'wasm.azure_openai\' in filter_state ? '
    'filter_state[\'wasm.azure_openai\'] : \'null\')%}\n')


def access_log(path):
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path),
        "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}]


def bootstrap(http_filters, clusters, buffer_limit=40_000_000,
              cluster_header="x-azure-openai-cluster", access_log_path=None):
    config = {
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "per_connection_buffer_limit_bytes": buffer_limit,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "codec_type": "AUTO",
                        # Over HTTP/2 the stream window bounds what Envoy holds
                        # for the filter (above max_request_body_bytes).
                        "http2_protocol_options": {
                            "initial_stream_window_size": 40_000_000,
                            "initial_connection_window_size": 40_000_000},
                        "local_reply_config": local_reply_config(cluster_header),
                        "route_config": {"name": "gateway", "virtual_hosts": [{
                            "name": "openai", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {
                                "cluster_header": cluster_header, "timeout": "0s"},
                                "request_headers_to_remove": [cluster_header]}]}]},
                        "http_filters": http_filters + [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                      "filters.http.router.v3.Router"}}],
                    }}]}],
            }],
            "clusters": clusters,
        },
        "stats_config": {"stats_tags": STATS_TAGS},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }
    if access_log_path:
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["access_log"] = access_log(access_log_path)
    return config


# Envoy 1.40 prefixes dynamic-module stats with `dynamicmodulescustom.`; with
# this runtime flag it strips that prefix in /stats/prometheus (as it does
# `wasmcustom.` for Wasm), so both builds' metrics have the same names.
NATIVE_RUNTIME = {"envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix": True}


def with_native_runtime(config):
    """`config` (a bootstrap dict) with NATIVE_RUNTIME in a static layer."""
    config = dict(config)
    runtime = dict(config.get("layered_runtime") or {})
    layers = list(runtime.get("layers") or [])
    layers.insert(0, {"name": "azure_openai_native", "static_layer": NATIVE_RUNTIME})
    runtime["layers"] = layers
    config["layered_runtime"] = runtime
    return config


class EnvoyFailed(Exception):
    pass


class Envoy:
    """An Envoy process running `config` (a dict written as JSON, or a path)."""

    def __init__(self, config, env=None, concurrency=2, log_level="info",
                 component_log_level=f"{FILTER_LOG_COMPONENT}:trace"):
        self.dir = Path(tempfile.mkdtemp(prefix="envoy-test-"))
        if NATIVE and isinstance(config, dict):
            config = with_native_runtime(config)
        if isinstance(config, (str, Path)):
            self.config_path = Path(config)
        else:
            self.config_path = self.dir / "envoy.json"
            self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = self.dir / "envoy.log"
        self.admin_path = self.dir / "admin"
        self.env = dict(os.environ)
        if NATIVE:
            self.env.update(NATIVE_ENV)
            self.env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(NATIVE_MODULE.parent)
        self.env.update(env or {})
        self.args = [str(ENVOY), "-c", str(self.config_path),
                     "--concurrency", str(concurrency), "--disable-hot-restart",
                     "--admin-address-path", str(self.admin_path),
                     "--log-level", log_level, "--log-path", str(self.log_path),
                     # Tests read the log while Envoy runs: flush it often.
                     "--file-flush-interval-msec", "20"]
        if component_log_level:
            self.args += ["--component-log-level", component_log_level]
        self.process = None
        self.port = None
        self.admin = None

    def start(self, timeout=30):
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvoyFailed(f"Envoy exited with {self.process.returncode}:\n{self.log()}")
            if self.admin_path.exists() and self.admin_path.read_text().strip():
                self.admin = "http://" + self.admin_path.read_text().strip()
                try:
                    if httpx.get(self.admin + "/ready", timeout=1).text.strip() == "LIVE":
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        else:
            self.stop()
            raise EnvoyFailed(f"Envoy did not become ready:\n{self.log()}")
        listeners = httpx.get(self.admin + "/listeners?format=json", timeout=5).json()
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.port = address["port_value"]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def run_expecting_failure(self, timeout=30):
        """Runs Envoy and returns (exit code, log) once it exits; fails the
        test if it is still serving after `timeout` seconds."""
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"Envoy kept running with a bad configuration:\n{self.log()}")
        return code, self.log()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle, timeout=3.0):
        """True once `needle` is in the log (Envoy writes it a little later)."""
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stats(self, prefix=""):
        text = httpx.get(f"{self.admin}/stats?filter={prefix}", timeout=5).text
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    def stop(self):
        terminate(self.process)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def validate(config_path, env=None):
    """`envoy --mode validate`; returns (exit code, output)."""
    native = {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(NATIVE_MODULE.parent), **NATIVE_ENV} \
        if NATIVE else {}
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config_path),
                             "--disable-hot-restart"],
                            env={**os.environ, **native, **(env or {})}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def assert_openai_error(response, status, code):
    """The response is the filter's OpenAI error JSON with this status and code."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------- Redis and the rate-limit service

def free_port():
    """A loopback port nothing listens on right now (for servers that cannot
    bind port 0 themselves and report it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Debian's redis-server on a free loopback port, in memory only (no RDB
    snapshots, no AOF), stopped by stop()."""

    def __init__(self, binary="redis-server"):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise RuntimeError("redis-server is missing: apt-get install redis-server "
                               "(tests/run.sh does)")
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process = None
        self.port = None

    def start(self, timeout=10):
        # The port is chosen here and bound by Redis a moment later: another
        # process may take it in between, so a few ports are tried.
        for _ in range(5):
            port = free_port()
            self.process = subprocess.Popen(
                [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                 "--logfile", str(self.dir / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if self._command(port, "PING") == b"+PONG":
                        self.port = port
                        self.url = f"redis://127.0.0.1:{port}"
                        return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"redis-server did not start:\n{self.log()}")

    @staticmethod
    def _command(port, *args):
        """One command in RESP; returns the reply's first line."""
        request = f"*{len(args)}\r\n".encode()
        for arg in args:
            arg = str(arg).encode()
            request += b"$%d\r\n%s\r\n" % (len(arg), arg)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n")[0]

    def command(self, *args):
        return self._command(self.port, *args)

    def flush(self):
        assert self.command("FLUSHALL") == b"+OK"

    def log(self):
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        terminate(self.process)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RateLimitService:
    """The tests' Envoy rate-limit service (tests/rls: Limitador's engine on
    Redis) on a port of its own choosing. Every request it decided is in
    requests(), as it received it."""

    def __init__(self, redis_url, limits_path):
        if not RLS.exists():
            raise RuntimeError(f"{RLS} is missing: cargo build --release --locked "
                               "--manifest-path tests/rls/Cargo.toml (tests/run.sh does)")
        self.dir = Path(tempfile.mkdtemp(prefix="rls-test-"))
        self.record = self.dir / "requests.jsonl"
        self.log_path = self.dir / "rls.log"
        self.args = [str(RLS), "--redis", redis_url, "--limits", str(limits_path),
                     "--listen", "127.0.0.1:0", "--record", str(self.record)]
        self.process = None
        self.port = None

    def start(self, timeout=30):
        self.record.write_text("")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log)
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the rate-limit service did not start ({line!r}):\n{self.log()}")
        self.port = int(line.split()[2].rsplit(":", 1)[1])
        return self

    def requests(self):
        """Every ShouldRateLimit request decided so far, oldest first: domain,
        hits_addend, descriptors (entries, their own hits_addend or None, the
        hits added, the counters that applied) and overall_code."""
        lines = self.record.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def clear(self, quiet=0.3, timeout=3.0):
        """Forgets what was recorded, once nothing new has come for `quiet`
        seconds: Envoy sends a stream's end-of-stream charge after its
        caller has the answer, so an earlier test's last charges can still
        be on their way."""
        deadline = time.monotonic() + timeout
        count, since = len(self.requests()), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.02)
            now = len(self.requests())
            if now != count:
                count, since = now, time.monotonic()
        self.record.write_text("")

    def wait_for(self, predicate, timeout=10.0):
        """requests() once predicate(requests()) holds; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.requests()
            if predicate(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"the rate-limit service never saw what was expected: {seen}")
            time.sleep(0.02)

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        terminate(self.process)

    def cleanup(self):
        self.stop()
        if self.process and self.process.stdout:
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def scrape(envoy):
    """/stats/prometheus as {(name, frozenset(labels)): value} for the filter's series."""
    out = {}
    text = httpx.get(envoy.admin + "/stats/prometheus", timeout=5).text
    for line in text.splitlines():
        match = re.match(r'^(azure_openai_[a-z_]+)\{(.*)\} (\S+)$', line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            out[(match.group(1), labels)] = float(match.group(3))
    return out
