"""Differential test: the same bytes through the filter and through the
parsers real upstream servers use.

Three upstreams read the deployment from the body: Azure's v1 API, an
OpenAI-compatible server (`kind: openai`) and the Responses API of an Azure
deployments-API resource (`/openai/responses`, deployment in `model`). Each
gets its own Envoy with the filter; the caller may use only alias `allowed`
(deployment `dep-allowed`), while `secret` (`dep-secret`) and `other` exist.

A few thousand seeded JSON and multipart bodies (differential_cases.py) go
through each body-reading route, OpenAI-style (`/v1/...`, alias in the body)
and Azure-style (`/openai/deployments/allowed/...`, where the filter sets the
body's model). For every request either:
- the filter refused it: a 4xx OpenAI error JSON, and no upstream received
  anything for it (requests are matched by a header); or
- it was forwarded, and every parser (differential_parsers.py: Python's json,
  orjson, jiter, an emulation of Go's case-insensitive encoding/json;
  Starlette/python-multipart, python-multipart's FormParser, Werkzeug; and
  real Go's encoding/json and mime/multipart when a Go toolchain is
  installed), given exactly the body and content-type the upstream received,
  either rejects it or sees exactly one model: `dep-allowed`. A forwarded JSON
  body must also be UTF-8 (RFC 8259 section 8.1).
All violations are collected and reported together at the end (with a JSON
file of every one). DIFFERENTIAL_SEED=n draws other bodies;
DIFFERENTIAL_DUMP=path writes every forwarded body, to try other parsers on.
"""

import concurrent.futures
import json
import os
import warnings
from collections import Counter, defaultdict

import httpx
import pytest
from differential_cases import all_cases
from differential_parsers import JSON_READERS, MULTIPART_READERS, build_go, go_readings
from harness import Envoy, RecordingUpstream, bootstrap, cluster, sha256_hex, wasm_filter

CALLER_KEY = "sk-differential-caller-7f3a9c"
ADMIN_KEY = "sk-differential-admin-1b2e4d"
DEPLOYMENT = "dep-allowed"
CASE_HEADER = "x-differential-case"
SEED = int(os.environ.get("DIFFERENTIAL_SEED", "20261201"))
# A file to write every forwarded body to (JSON lines: family, kind, content
# type and body as received upstream, latin-1), for trying other parsers.
DUMP = os.environ.get("DIFFERENTIAL_DUMP")
RESPONSES_VERSION = "2025-04-01-preview"
AZURE_STYLE = "?api-version=2024-10-21"


def upstream_settings(target, port):
    if target == "v1":
        return {"endpoint": f"http://127.0.0.1:{port}", "cluster": "target", "api": "v1",
                "auth": {"api_key": {"value": "upstream-key-v1"}}}
    if target == "openai":
        return {"kind": "openai", "endpoint": f"http://127.0.0.1:{port}/v1", "cluster": "target",
                "auth": {"bearer": {"value": "upstream-token-openai"}}}
    return {"endpoint": f"http://127.0.0.1:{port}", "cluster": "target", "api_version": "2024-10-21",
            "auth": {"api_key": {"value": "upstream-key-deployments"}}}


def filter_config(target, port):
    return {
        "upstreams": {"target": upstream_settings(target, port)},
        "models": {alias: {"upstream": "target", "deployment": f"dep-{alias}"}
                   for alias in ("allowed", "secret", "other")},
        "callers": [
            {"name": "caller", "key_sha256": sha256_hex(CALLER_KEY), "models": ["allowed"]},
            {"name": "admin", "key_sha256": sha256_hex(ADMIN_KEY), "models": ["*"]},
        ],
    }


# (target, path sent, path the upstream must receive)
JSON_ROUTES = [
    ("v1", "/v1/chat/completions", "/openai/v1/chat/completions"),
    ("openai", "/v1/chat/completions", "/v1/chat/completions"),
    ("deployments", "/v1/responses", f"/openai/responses?api-version={RESPONSES_VERSION}"),
    ("v1", "/v1/embeddings", "/openai/v1/embeddings"),
    ("openai", "/v1/responses", "/v1/responses"),
    ("deployments", f"/openai/responses?api-version={RESPONSES_VERSION}",
     f"/openai/responses?api-version={RESPONSES_VERSION}"),
    ("v1", "/v1/responses", "/openai/v1/responses"),
    ("openai", "/v1/embeddings", "/v1/embeddings"),
]
JSON_AZURE_STYLE_ROUTES = [
    ("v1", "/openai/deployments/allowed/chat/completions" + AZURE_STYLE, "/openai/v1/chat/completions"),
    ("openai", "/openai/deployments/allowed/chat/completions" + AZURE_STYLE, "/v1/chat/completions"),
    ("v1", "/openai/deployments/allowed/embeddings" + AZURE_STYLE, "/openai/v1/embeddings"),
    ("openai", "/openai/deployments/allowed/embeddings" + AZURE_STYLE, "/v1/embeddings"),
]
MULTIPART_ROUTES = [
    ("v1", "/v1/audio/transcriptions", "/openai/v1/audio/transcriptions"),
    ("openai", "/v1/audio/transcriptions", "/v1/audio/transcriptions"),
    ("v1", "/v1/images/edits", "/openai/v1/images/edits"),
    ("openai", "/v1/images/edits", "/v1/images/edits"),
]
MULTIPART_AZURE_STYLE_ROUTES = [
    ("v1", "/openai/deployments/allowed/audio/transcriptions" + AZURE_STYLE,
     "/openai/v1/audio/transcriptions"),
    ("openai", "/openai/deployments/allowed/audio/transcriptions" + AZURE_STYLE,
     "/v1/audio/transcriptions"),
]


@pytest.fixture(scope="module")
def targets():
    """One recording upstream and one Envoy per upstream kind."""
    started = {}
    try:
        for target in ("v1", "openai", "deployments"):
            upstream = RecordingUpstream(target)
            started[target] = (upstream, None)
            config = bootstrap([wasm_filter(filter_config(target, upstream.port))],
                               [cluster("target", upstream.port)])
            envoy = Envoy(config, component_log_level=None).start()
            started[target] = (upstream, envoy)
        yield started
    finally:
        for upstream, envoy in started.values():
            if envoy:
                envoy.cleanup()
            upstream.stop()


def requests_for(cases):
    """Each case goes through one OpenAI-style and one Azure-style route,
    rotating over upstreams and operations."""
    out = []
    for index, case in enumerate(cases):
        if case.kind == "json":
            routes = (JSON_ROUTES, JSON_AZURE_STYLE_ROUTES)
        else:
            routes = (MULTIPART_ROUTES, MULTIPART_AZURE_STYLE_ROUTES)
        for style, table in zip(("openai-style", "azure-style"), routes):
            target, path, upstream_path = table[index % len(table)]
            out.append({"id": str(len(out)), "case": case, "style": style, "target": target,
                        "path": path, "upstream_path": upstream_path})
    return out


def send(client, envoys, request):
    case = request["case"]
    headers = {"authorization": f"Bearer {CALLER_KEY}", "content-type": case.content_type,
               CASE_HEADER: request["id"]}
    response = client.post(envoys[request["target"]].url + request["path"], content=case.body,
                           headers=headers)
    return response.status_code, response.headers.get("content-type"), response.content


def is_openai_error(content_type, content):
    if content_type != "application/json":
        return False
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == {"message", "type", "param", "code"})


def short(data, limit=600):
    text = repr(data)
    return text if len(text) <= limit else text[:limit] + f"... ({len(data)} bytes)"


def content_type_of(received):
    return (received.header("content-type") or "").encode("latin-1")


def python_readings(kind, received):
    if kind == "json":
        return {name: read(received.body) for name, read in JSON_READERS.items()}
    return {name: read(received.body, content_type_of(received))
            for name, read in MULTIPART_READERS.items()}


@pytest.fixture(scope="module")
def go_parser(tmp_path_factory):
    """Real Go (encoding/json, mime/multipart), when a Go toolchain is
    installed (Debian: golang-go); None otherwise."""
    exe = build_go(tmp_path_factory.mktemp("goparse"))
    if exe is None:
        warnings.warn("no `go` on PATH: real Go parsers not run (the encoding/json emulation is); "
                      "apt-get install golang-go to add them")
    return exe


def test_no_parser_reads_another_model(targets, go_parser, tmp_path_factory):
    cases = all_cases(SEED, json_mutations=1000, multipart_mutations=1000)
    requests = requests_for(cases)
    envoys = {target: envoy for target, (_, envoy) in targets.items()}
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16)) as client:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: send(client, envoys, r), requests))

    received = defaultdict(list)  # request id -> [(target, Received)]
    for target, (upstream, _) in targets.items():
        for got in upstream.received:
            received[got.header(CASE_HEADER)].append((target, got))

    violations = []
    tally = defaultdict(Counter)  # family -> outcome counts

    def violation(request, reason, status, got=None, parsers=None, wrong=()):
        case = request["case"]
        violations.append({
            "family": case.family, "label": case.label, "request": request["id"],
            "route": f"{request['style']} {request['target']} {request['path'].split('?')[0]}",
            "reason": reason, "status": status, "content_type": case.content_type.decode("latin-1"),
            "body": short(case.body),
            "upstream_content_type": got.header("content-type") if got else None,
            "upstream_body": short(got.body) if got else None,
            "parsers": parsers or {}, "wrong": list(wrong),
        })
        tally[case.family]["violations"] += 1

    # Pass 1: refused (and nothing upstream), or forwarded once, to the right place.
    forwarded = []  # (request, Received)
    for request, (status, content_type, content) in zip(requests, answers):
        family = request["case"].family
        tally[family]["sent"] += 1
        arrived = received.pop(request["id"], [])
        if 400 <= status < 500:
            tally[family]["refused"] += 1
            if arrived:
                violation(request, f"refused with {status}, but {len(arrived)} request(s) reached an "
                          "upstream", status)
            elif not is_openai_error(content_type, content):
                violation(request, f"refused with {status} but not in OpenAI error JSON: "
                          f"{short(content, 120)}", status)
        elif status != 200:
            violation(request, f"answered {status}: {short(content, 120)}", status)
        elif len(arrived) != 1 or arrived[0][0] != request["target"]:
            violation(request, f"forwarded, but upstreams received {[t for t, _ in arrived]}", status)
        else:
            tally[family]["forwarded"] += 1
            got = arrived[0][1]
            if got.path != request["upstream_path"]:
                violation(request, f"forwarded to {got.path!r}, expected {request['upstream_path']!r}",
                          status, got)
            forwarded.append((request, got))
    for stray in received:
        violations.append({"family": "?", "reason": f"an upstream received unknown request {stray!r}"})

    # Pass 2: every parser reads exactly what each upstream received.
    if go_parser is not None:
        go = go_readings(go_parser, [(r["case"].kind, content_type_of(got), got.body)
                                     for r, got in forwarded])
    else:
        go = [{} for _ in forwarded]
    rejections = defaultdict(lambda: [0, 0])  # parser -> [bodies read, bodies it refused]
    dumped = []
    for (request, got), go_reading in zip(forwarded, go):
        case = request["case"]
        seen = {**python_readings(case.kind, got), **go_reading}
        for name, reading in seen.items():
            rejections[name][0] += 1
            rejections[name][1] += bool(reading.rejected)
        if case.family == "baseline":  # plain bodies: a parser that refuses them is miswired
            wrong = [name for name, r in seen.items() if r.models != [DEPLOYMENT]]
        else:
            wrong = [name for name, r in seen.items() if not r.sees_only(DEPLOYMENT)]
        shown = {name: r.show() for name, r in seen.items()}
        if wrong:
            violation(request, "parsers read another model: " + ", ".join(sorted(wrong)), 200, got,
                      shown, wrong)
        if case.kind == "json":
            try:
                got.body.decode("utf-8")
            except UnicodeDecodeError as error:
                violation(request, f"forwarded a JSON body that is not UTF-8 ({error.reason} at byte "
                          f"{error.start})", 200, got, shown)
        if DUMP:
            dumped.append({"family": case.family, "label": case.label, "kind": case.kind,
                           "content_type": got.header("content-type"),
                           "body": got.body.decode("latin-1")})
    if DUMP:
        with open(DUMP, "w") as out:
            out.writelines(json.dumps(d) + "\n" for d in dumped)

    if violations:
        report = tmp_path_factory.mktemp("differential") / "violations.json"
        report.write_text(json.dumps({"seed": SEED, "tally": tally, "violations": violations}, indent=1))
        pytest.fail(summary(tally, violations, report, rejections), pytrace=False)
    # The parsers are live: each read (and did not refuse) most forwarded bodies.
    for name, (read, refused) in rejections.items():
        assert read and refused < read, (name, read, refused)


def summary(tally, violations, report, rejections, limit=24000):
    by_family = defaultdict(list)
    for v in violations:
        by_family[v["family"]].append(v)
    lines = [f"{len(violations)} violations in {len(by_family)} case families (seed {SEED}); "
             f"all of them in {report}", "",
             f"{'family':28} {'sent':>5} {'refused':>7} {'fwd':>5} {'bad':>5}  parsers that read another model"]
    for family in sorted(tally):
        t = tally[family]
        who = Counter(name for v in by_family.get(family, []) for name in v.get("wrong", ()))
        other = Counter(v["reason"].split(":")[0].split("(")[0].strip() for v in by_family.get(family, [])
                        if not v.get("wrong"))
        text = ", ".join(f"{n} {c}" for n, c in who.most_common())
        text += "".join(f"; {r} {c}" for r, c in other.most_common())
        lines.append(f"{family:28} {t['sent']:5} {t['refused']:7} {t['forwarded']:5} "
                     f"{t['violations']:5}  {text}")
    lines.append("parsers that refused forwarded bodies (fine, the upstream refuses them too): "
                 + ", ".join(f"{n} {r}/{t}" for n, (t, r) in sorted(rejections.items())))
    lines.append("")
    for family in sorted(by_family):
        found = by_family[family]
        lines.append(f"== {family}: {len(found)} violation(s), for example:")
        shown_labels = set()
        for v in found:
            key = (v.get("label"), v["reason"])
            if key in shown_labels:
                continue
            shown_labels.add(key)
            lines.append(f"  [{v.get('label', '')}] {v.get('route', '')}: {v['reason']}")
            lines.append(f"    sent {v.get('content_type', '')}: {v.get('body', '')[:600]}")
            if v.get("upstream_body"):
                lines.append(f"    upstream got: {v['upstream_body'][:120]}")
            for name, reading in v.get("parsers", {}).items():
                lines.append(f"      {name:27} {reading}")
            if len(shown_labels) >= (1 if len(by_family) > 6 else 3):
                break
    text = "\n".join(lines)
    return text if len(text) <= limit else text[:limit] + "\n... (cut; see the report file)"
