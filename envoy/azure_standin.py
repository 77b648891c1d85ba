#!/usr/bin/env python3
"""A local stand-in for an Azure OpenAI resource, for the demo gateway.

It answers the way Azure does, for the deployments API
(/openai/deployments/{deployment}/{operation}?api-version=...), the
resource-level Responses API (/openai/responses) and the v1 API
(/openai/v1/{operation}, deployment in the body): the api-key check, the
api-version requirement (and the Responses API's minimum), unknown
deployments (404 DeploymentNotFound), Azure's response shapes
(content-filter results, versioned model names, rate-limit headers), chat
SSE streams whose first chunk carries only prompt_filter_results and whose
first choice chunk carries the assistant role, Responses API streams
(response.created ... response.completed with usage), stored responses and
their input items, embeddings as floats or base64, multipart audio and image
uploads (with or without content-length), and binary speech. Standard
library only.

    python3 envoy/azure_standin.py --port 10001 --key "$AZURE_DEMO_KEY" \\
        --deployment gpt4o-demo --deployment embed-demo
"""

import argparse
import base64
import hashlib
import json
import re
import struct
import sys
import threading
import time
import uuid
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

OPERATIONS = ("chat/completions", "completions", "embeddings", "images/generations",
              "images/edits", "audio/transcriptions", "audio/translations", "audio/speech",
              "responses")
DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/([^/]+)/(.+)$")
STORED_RESPONSE = re.compile(r"^/openai(?:/v1)?/responses/([A-Za-z0-9_-]+)(/input_items|/cancel)?$")
FILTER_OK = {name: {"filtered": False, "severity": "safe"}
             for name in ("hate", "self_harm", "sexual", "violence")}
RESPONSES_MIN_API_VERSION = "2025-03-01-preview"


class Refusal(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def not_found():
    return Refusal(404, "404", "Resource not found")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "azure-standin"

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write("azure-standin: " + (fmt % args) + "\n")

    def do_POST(self):
        self.handle_request()

    def do_GET(self):
        self.handle_request()

    def do_DELETE(self):
        self.handle_request()

    def handle_request(self):
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            raw = read_chunked(self.rfile)  # uploads streamed without content-length
        else:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
        try:
            self.route(raw)
        except Refusal as refusal:
            self.send_json(refusal.status, {"error": {"code": refusal.code, "message": refusal.message}})

    def route(self, raw):
        if self.headers.get("api-key") != self.server.key:
            raise Refusal(401, "401", "Access denied due to invalid subscription key or wrong API "
                          "endpoint. Make sure to provide a valid key for an active subscription "
                          "and use a correct regional API endpoint for your resource.")
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        stored = STORED_RESPONSE.match(url.path)
        if stored:
            return self.stored_response(stored.group(1), stored.group(2) or "")
        if self.command != "POST":
            raise not_found()
        match = DEPLOYMENT_PATH.match(url.path)
        if match:  # the deployments API: dated api-version, deployment in the path
            deployment, operation = match.groups()
            if "api-version" not in query or operation not in OPERATIONS or operation == "responses":
                raise not_found()
            return self.operation(operation, self.known(deployment), raw)
        if url.path == "/openai/responses":
            version = (query.get("api-version") or [""])[0]
            if not version:
                raise not_found()
            if version.removesuffix("-preview") < RESPONSES_MIN_API_VERSION.removesuffix("-preview"):
                raise Refusal(400, "BadRequest", "Azure OpenAI Responses API is enabled only for "
                              f"api-version {RESPONSES_MIN_API_VERSION} and later")
            return self.operation("responses", None, raw)
        operation = url.path.removeprefix("/openai/v1/")
        if url.path.startswith("/openai/v1/") and operation in OPERATIONS:
            return self.operation(operation, None, raw)  # the v1 API: deployment in the body
        raise not_found()

    def known(self, deployment):
        if self.server.deployments and deployment not in self.server.deployments:
            raise Refusal(404, "DeploymentNotFound",
                          "The API deployment for this resource does not exist. If you created "
                          "the deployment within the last 5 minutes, please wait a moment and try "
                          "again.")
        return deployment

    def operation(self, operation, deployment, raw):
        if operation in ("images/edits", "audio/transcriptions", "audio/translations"):
            fields = form_fields(self.headers.get("content-type", ""), raw)
            body = {name: value for name, value in fields.items() if isinstance(value, str)}
            uploads = {name: value for name, value in fields.items() if isinstance(value, bytes)}
        else:
            try:
                body = json.loads(raw)
            except ValueError:
                raise Refusal(400, "BadRequest", "Invalid JSON body")
            uploads = {}
        if deployment is None:  # v1 API and Responses API: the deployment is the body's model
            deployment = self.known(body.get("model") or "")
        if operation == "embeddings":
            return self.send_json(200, embeddings(body))
        if operation == "images/generations" or operation == "images/edits":
            return self.send_json(200, {"created": int(time.time()), "data": [
                {"b64_json": PIXEL, "revised_prompt": body.get("prompt", "")}]})
        if operation in ("audio/transcriptions", "audio/translations"):
            size = sum(len(v) for v in uploads.values())
            return self.send_json(200, {"text": f"Stand-in transcript of {size} bytes of audio."})
        if operation == "audio/speech":
            return self.send_bytes(200, "audio/wav", silence_wav())
        if operation == "responses":
            response = response_object(deployment, body)
            with self.server.lock:
                self.server.responses[response["id"]] = (response, input_items(body))
            if body.get("stream"):
                return self.send_response_stream(response)
            return self.send_json(200, response)
        if body.get("stream"):
            return self.send_stream(deployment, operation, body)
        return self.send_json(200, completion(deployment, operation, body))

    def stored_response(self, rid, tail):
        with self.server.lock:
            stored = self.server.responses.get(rid)
            if stored and self.command == "DELETE" and not tail:
                del self.server.responses[rid]
        if stored is None:
            raise Refusal(404, "NotFound", f"Response with id '{rid}' not found.")
        response, items = stored
        if tail == "/input_items":
            if self.command != "GET":
                raise not_found()
            return self.send_json(200, {"object": "list", "data": items,
                                        "first_id": items[0]["id"] if items else None,
                                        "last_id": items[-1]["id"] if items else None,
                                        "has_more": False})
        if tail == "/cancel":
            if self.command != "POST":
                raise not_found()
            # As on OpenAI and Azure: only a background response can be cancelled.
            if not response.get("background"):
                raise Refusal(400, "invalid_request_error",
                              "Only responses created with background=true can be cancelled.")
            with self.server.lock:
                response["status"] = "cancelled"
            return self.send_json(200, response)
        if self.command == "DELETE":
            return self.send_json(200, {"id": rid, "object": "response", "deleted": True})
        return self.send_json(200, response)

    def common_headers(self):
        self.send_header("apim-request-id", str(uuid.uuid4()))
        self.send_header("x-ms-region", "Local Stand-in")
        self.send_header("x-ratelimit-remaining-requests", "99")
        self.send_header("x-ratelimit-remaining-tokens", "99000")

    def send_json(self, status, payload):
        self.send_bytes(status, "application/json", json.dumps(payload).encode())

    def send_bytes(self, status, content_type, data):
        self.send_response(status)
        self.send_header("content-type", content_type)
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
        kind = "chat.completion.chunk" if operation == "chat/completions" else "text_completion"
        if operation == "chat/completions":
            # As on Azure and OpenAI: the first choice chunk names the role.
            event(json.dumps({"id": ident, "object": kind, "created": created,
                              "model": model_name(deployment), "choices": [
                                  {"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None, "content_filter_results": {}}]}))
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            if operation == "chat/completions":
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None,
                          "content_filter_results": FILTER_OK}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
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


    def send_response_stream(self, response):
        """The Responses API's SSE: typed events with sequence numbers, the
        text in deltas, ending with response.completed carrying usage."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.common_headers()
        self.end_headers()
        sequence = 0

        def event(kind, **payload):
            nonlocal sequence
            data = json.dumps({"type": kind, "sequence_number": sequence, **payload})
            sequence += 1
            chunk = f"event: {kind}\ndata: {data}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()

        message = response["output"][0]
        text = message["content"][0]["text"]
        pending = dict(response, status="in_progress", output=[], usage=None)
        event("response.created", response=pending)
        event("response.in_progress", response=pending)
        item = dict(message, status="in_progress", content=[])
        event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "annotations": [], "text": ""}
        event("response.content_part.added", item_id=message["id"], output_index=0,
              content_index=0, part=part)
        for i, word in enumerate(text.split(" ")):
            event("response.output_text.delta", item_id=message["id"], output_index=0,
                  content_index=0, delta=word if i == 0 else " " + word)
            time.sleep(self.server.chunk_delay)
        event("response.output_text.done", item_id=message["id"], output_index=0,
              content_index=0, text=text)
        event("response.content_part.done", item_id=message["id"], output_index=0,
              content_index=0, part=dict(part, text=text))
        event("response.output_item.done", output_index=0, item=message)
        event("response.completed", response=response)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def read_chunked(stream):
    body = b""
    while True:
        size = int(stream.readline().split(b";")[0], 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        body += stream.read(size)
        stream.readline()


# A 1x1 transparent PNG.
PIXEL = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
         "60e6kgAAAABJRU5ErkJggg==")


def form_fields(content_type, raw):
    """multipart/form-data fields: text as str, files as bytes."""
    if "multipart/form-data" not in content_type:
        raise Refusal(400, "BadRequest", "Expected multipart/form-data")
    message = BytesParser(policy=policy.HTTP).parsebytes(b"content-type: " + content_type.encode() + b"\r\n\r\n" + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        fields[name] = payload if part.get_filename() else payload.decode()
    return fields


def silence_wav(seconds=0.25, rate=16000):
    frames = b"\x00\x00" * int(seconds * rate)
    return (b"RIFF" + struct.pack("<I", 36 + len(frames)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(frames)) + frames)


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


def input_items(body):
    """The stored input of a response, as input_items lists it."""
    given = body.get("input")
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else (given or [])
    items = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "input_text", "text": content}]
        items.append({"type": "message", "id": "msg_" + uuid.uuid4().hex[:16], "status": "completed",
                      "role": message.get("role", "user"), "content": content})
    return items


def response_object(deployment, body):
    text = body.get("input")
    text = text if isinstance(text, str) else json.dumps(text)
    background = bool(body.get("background"))
    return {"id": "resp_" + uuid.uuid4().hex, "object": "response", "background": background,
            "created_at": int(time.time()), "status": "queued" if background else "completed",
            "model": model_name(deployment),
            "output": [{"type": "message", "id": "msg_" + uuid.uuid4().hex[:16],
                        "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "annotations": [],
                                     "text": f"Hello from the Azure stand-in. You said: {text[:200]}"}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14}}


def embeddings(body):
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(json.dumps(item).encode()).digest()
        vector = [round(b / 255 - 0.5, 4) for b in digest[:16]]
        if body.get("encoding_format") == "base64":
            # Little-endian float32, as Azure and OpenAI send it (and as the
            # OpenAI SDKs ask for by default).
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
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

    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as error:
        print(f"azure-standin: cannot listen on {args.host}:{args.port}: {error.strerror}",
              file=sys.stderr)
        sys.exit(1)
    server.daemon_threads = True
    server.key = args.key
    server.deployments = set(args.deployment)
    server.chunk_delay = args.chunk_delay
    server.quiet = args.quiet
    server.responses = {}
    server.lock = threading.Lock()
    print(f"azure-standin listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
