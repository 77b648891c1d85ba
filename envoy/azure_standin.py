#!/usr/bin/env python3
"""A local stand-in for an Azure OpenAI resource, for the demo gateway.

It answers the deployment-scoped API the way Azure does: the api-key check,
the api-version requirement, unknown deployments, Azure's response shapes
(content-filter results, versioned model names, rate-limit headers) and SSE
streams whose first chunk carries only prompt_filter_results. Standard
library only.

    python3 envoy/azure_standin.py --port 10001 --key "$AZURE_DEMO_KEY" \
        --deployment gpt4o-demo --deployment embed-demo
"""

import argparse
import hashlib
import json
import re
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
FILTER_OK = {name: {"filtered": False, "severity": "safe"}
             for name in ("hate", "self_harm", "sexual", "violence")}


def azure_error(status, code, message):
    return status, {"error": {"code": code, "message": message}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "azure-standin"

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write("azure-standin: " + (fmt % args) + "\n")

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        match = PATH.match(url.path)
        if self.headers.get("api-key") != self.server.key:
            return self.send_json(*azure_error(
                401, "401", "Access denied due to invalid subscription key or wrong API "
                "endpoint. Make sure to provide a valid key for an active subscription and "
                "use a correct regional API endpoint for your resource."))
        if not match:
            return self.send_json(*azure_error(404, "404", "Resource not found"))
        if "api-version" not in query:
            return self.send_json(*azure_error(404, "404", "Resource not found"))
        deployment, operation = match.groups()
        if self.server.deployments and deployment not in self.server.deployments:
            return self.send_json(*azure_error(
                404, "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again."))
        try:
            body = json.loads(raw)
        except ValueError:
            return self.send_json(*azure_error(400, "BadRequest", "Invalid JSON body"))
        if operation == "embeddings":
            return self.send_json(200, embeddings(body))
        if body.get("stream"):
            return self.send_stream(deployment, operation, body)
        return self.send_json(200, completion(deployment, operation, body))

    def do_GET(self):
        self.send_json(*azure_error(404, "404", "Resource not found"))

    def common_headers(self):
        self.send_header("apim-request-id", str(uuid.uuid4()))
        self.send_header("x-ms-region", "Local Stand-in")
        self.send_header("x-ratelimit-remaining-requests", "99")
        self.send_header("x-ratelimit-remaining-tokens", "99000")

    def send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.common_headers()
        self.end_headers()
        self.wfile.write(data)

    def send_stream(self, deployment, operation, body):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.common_headers()
        self.end_headers()

        def event(payload):
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        created = int(time.time())
        ident = "chatcmpl-" + uuid.uuid4().hex[:24]
        # Azure's first chunk: no choices, only the prompt's filter results.
        event(json.dumps({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                          "prompt_filter_results": [{"prompt_index": 0,
                                                     "content_filter_results": FILTER_OK}]}))
        words = reply_text(body).split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            if operation == "chat/completions":
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None,
                          "content_filter_results": FILTER_OK}
                kind = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
                kind = "text_completion"
            event(json.dumps({"id": ident, "object": kind, "created": created,
                              "model": model_name(deployment), "choices": [choice]}))
            time.sleep(self.server.chunk_delay)
        done = {"index": 0, "finish_reason": "stop"}
        done.update({"delta": {}} if operation == "chat/completions" else {"text": ""})
        final = {"id": ident, "object": kind, "created": created,
                 "model": model_name(deployment), "choices": [done]}
        if (body.get("stream_options") or {}).get("include_usage"):
            final["usage"] = usage(body)
        event(json.dumps(final))
        event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def reply_text(body):
    prompt = body.get("prompt")
    messages = body.get("messages") or []
    if messages:
        prompt = messages[-1].get("content")
    if not isinstance(prompt, str):
        prompt = json.dumps(prompt)
    return f"Hello from the Azure stand-in. You said: {prompt[:200]}"


def model_name(deployment):
    return "text-embedding-3-small" if "embed" in deployment else "gpt-4o-2024-08-06"


def usage(body):
    prompt = len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4
    completion = len(reply_text(body)) // 4
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(deployment, operation, body):
    text = reply_text(body)
    common = {"created": int(time.time()), "model": model_name(deployment),
              "usage": usage(body),
              "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER_OK}]}
    if operation == "chat/completions":
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": text},
                             "content_filter_results": FILTER_OK}], **common}
    return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None,
                         "content_filter_results": FILTER_OK}], **common}


def embeddings(body):
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(json.dumps(item).encode()).digest()
        data.append({"object": "embedding", "index": i,
                     "embedding": [round(b / 255 - 0.5, 4) for b in digest[:16]]})
    return {"object": "list", "data": data, "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10001, help="0 picks a free port")
    parser.add_argument("--key", required=True, help="the api-key the stand-in accepts")
    parser.add_argument("--deployment", action="append", default=[],
                        help="a deployment that exists (repeat); none means any")
    parser.add_argument("--chunk-delay", type=float, default=0.05,
                        help="seconds between streamed chunks")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.key = args.key
    server.deployments = set(args.deployment)
    server.chunk_delay = args.chunk_delay
    server.quiet = args.quiet
    print(f"azure-standin listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
