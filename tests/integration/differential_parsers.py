"""How upstream servers read a request body: real third-party parsers (and one
emulation of Go's encoding/json, which has no Python port), each reduced to
the model it would use.

Every reader returns a `Reading`: either `rejected` (the parser refuses the
body outright, so the upstream answers 4xx and no model is reached) or the
model values it sees. Used by test_differential.py on exactly the bytes an
upstream received.
"""

import asyncio
import codecs
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pydantic_core
import python_multipart
from starlette.requests import Request
from werkzeug.formparser import parse_form_data

MISSING = "<missing>"

# python-multipart logs a warning for every malformed form; the readings say it.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass
class Reading:
    """What one parser made of a body."""
    rejected: str = ""  # why, when the parser refused the body
    models: list = field(default_factory=list)  # the model value(s) it would use
    note: str = ""  # anything else worth showing (files named model, ...)

    def show(self):
        if self.rejected:
            return f"rejected ({self.rejected})"
        text = ", ".join(repr(m) if m is not MISSING else MISSING for m in self.models) or "no model"
        return f"[{text}]" + (f" {self.note}" if self.note else "")

    def sees_only(self, deployment):
        """True if the parser refused the body or uses exactly `deployment`."""
        return bool(self.rejected) or self.models == [deployment]


def _rejected(error):
    text = str(error).replace("\n", " ")
    return Reading(rejected=f"{type(error).__name__}: {text[:80]}")


# ---------------------------------------------------------------- JSON

def python_json(body):
    """Python's json, as Starlette's `Request.json()` and FastAPI call it:
    `json.loads(bytes)` (encoding sniffed, UTF-8 BOM skipped, surrogates
    passed), duplicate keys: last wins. This is what vLLM and most Python
    OpenAI-compatible servers validate with pydantic."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as error:
        return _rejected(error)
    return _top_level_model(value)


def orjson_reader(body):
    """orjson (strict RFC 8259, UTF-8 validated), duplicate keys: last wins."""
    try:
        value = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError) as error:
        return _rejected(error)
    return _top_level_model(value)


def jiter_reader(body):
    """pydantic-core's JSON parser (jiter), behind pydantic's
    `model_validate_json`, used by servers that validate raw bodies."""
    try:
        value = pydantic_core.from_json(body)
    except (ValueError, RecursionError) as error:
        return _rejected(error)
    return _top_level_model(value)


def _top_level_model(value):
    if not isinstance(value, dict):
        return Reading(rejected=f"top-level {type(value).__name__}, not an object")
    return Reading(models=[value.get("model", MISSING)])


GO_MAX_DEPTH = 10000  # encoding/json scanner.go: maxNestingDepth
_GO_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_GO_WS = b" \t\r\n"


class GoSyntaxError(Exception):
    pass


# Go's utf8.DecodeRune yields one U+FFFD per invalid byte.
codecs.register_error("go-replace", lambda e: ("\ufffd" * (e.end - e.start), e.end))


def go_fold(name):
    """encoding/json fold.go `foldName`: ASCII letters upper-cased, other runes
    mapped to `unicode.ToUpper(unicode.ToLower(r))` (simple case mapping,
    approximated here by Python's one-character mappings)."""
    out = []
    for c in name:
        if c < "\x80":
            out.append(c.upper())
            continue
        lower = c.lower() if len(c.lower()) == 1 else c
        upper = lower.upper() if len(lower.upper()) == 1 else lower
        out.append(upper)
    return "".join(out)


def go_json(body):
    """An emulation of Go's encoding/json decoding the body into
    `struct { Model string `json:"model"` }` with `json.NewDecoder(r).Decode`,
    as Ollama (through gin's ShouldBindJSON) and many Go OpenAI-compatible
    servers do. Behaviour reproduced from Go's documentation and source:
    - object keys match a field "preferring an exact match but also accepting
      a case-insensitive match" (decode.go; fold.go foldName), and a later
      matching key overwrites an earlier one: `MODEL` after `model` wins;
    - `null` for a string field is a no-op (decode.go literalStore);
    - any other non-string value for it is an UnmarshalTypeError (the request
      is refused);
    - invalid UTF-8 and lone surrogate escapes in strings become U+FFFD
      (decode.go unquoteBytes), they are not errors;
    - the scanner allows nesting up to 10000 (scanner.go maxNestingDepth);
    - `Decoder.Decode` reads the first JSON value and ignores what follows;
      a BOM, comments, NaN or single quotes are syntax errors.
    No PyPI package reproduces this, hence the emulation; where a Go
    toolchain is installed the test also runs real Go (`go_readings`), and
    the two agree on every body the cases generate."""
    try:
        return _go_decode(body)
    except GoSyntaxError as error:
        return Reading(rejected=f"go: {error}")


def _go_ws(s, i):
    while i < len(s) and s[i] in _GO_WS:
        i += 1
    return i


def _go_string(s, i):
    """The string literal at s[i] (a quote): (decoded text, index after it)."""
    if s[i:i + 1] != b'"':
        raise GoSyntaxError(f"invalid character {s[i:i + 1]!r} looking for beginning of string")
    out = []
    raw = bytearray()
    i += 1
    while True:
        if i >= len(s):
            raise GoSyntaxError("unexpected end of JSON input")
        b = s[i]
        if b == 0x22:
            i += 1
            break
        if b < 0x20:
            raise GoSyntaxError("invalid character in string literal")
        if b != 0x5C:
            raw.append(b)
            i += 1
            continue
        out.append(raw.decode("utf-8", "go-replace"))
        raw = bytearray()
        e = s[i + 1:i + 2]
        simple = {b'"': '"', b"\\": "\\", b"/": "/", b"b": "\b", b"f": "\f",
                  b"n": "\n", b"r": "\r", b"t": "\t"}
        if e in simple:
            out.append(simple[e])
            i += 2
            continue
        if e != b"u":
            raise GoSyntaxError("invalid character in string escape code")
        code = _go_u4(s, i)
        i += 6
        if 0xD800 <= code < 0xDC00 and s[i:i + 2] == b"\\u":
            low = _go_u4(s, i)
            if 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 6
                continue
        out.append("\ufffd" if 0xD800 <= code < 0xE000 else chr(code))
    out.append(raw.decode("utf-8", "go-replace"))
    return "".join(out), i


def _go_u4(s, i):
    digits = s[i + 2:i + 6]
    if len(digits) != 4 or not all(chr(c) in "0123456789abcdefABCDEF" for c in digits):
        raise GoSyntaxError("invalid character in \\u hexadecimal character escape")
    return int(digits, 16)


def _go_scalar_end(s, i):
    if s[i:i + 1] == b'"':
        return _go_string(s, i)[1]
    for literal in (b"true", b"false", b"null"):
        if s.startswith(literal, i):
            return i + len(literal)
    match = _GO_NUMBER.match(s, i)
    if match and match.end() > i:
        return match.end()
    if i >= len(s):
        raise GoSyntaxError("unexpected end of JSON input")
    raise GoSyntaxError(f"invalid character {s[i:i + 1]!r} looking for beginning of value")


def _go_value_end(s, i, depth):
    """Validates the value at s[i] iteratively; returns the index after it."""
    stack = []
    i = _go_ws(s, i)
    while True:
        opener = s[i:i + 1]
        if opener in (b"{", b"["):
            if depth + len(stack) + 1 > GO_MAX_DEPTH:
                raise GoSyntaxError("exceeded max depth")
            stack.append(opener)
            i = _go_ws(s, i + 1)
            closer = b"}" if opener == b"{" else b"]"
            if s[i:i + 1] == closer:
                stack.pop()
                i += 1
            else:
                if opener == b"{":
                    i = _go_key_colon(s, i)
                continue  # a value starts at i
        else:
            i = _go_scalar_end(s, i)
        # After a value: commas and closers.
        while stack:
            i = _go_ws(s, i)
            c = s[i:i + 1]
            if c == b",":
                i = _go_ws(s, i + 1)
                if stack[-1] == b"{":
                    i = _go_key_colon(s, i)
                break
            if c == (b"}" if stack[-1] == b"{" else b"]"):
                stack.pop()
                i += 1
                continue
            raise GoSyntaxError(f"invalid character {c!r} after value")
        else:
            return i
        i = _go_ws(s, i)


def _go_key_colon(s, i):
    _, i = _go_string(s, i)
    i = _go_ws(s, i)
    if s[i:i + 1] != b":":
        raise GoSyntaxError("invalid character after object key")
    return _go_ws(s, i + 1)


def _go_decode(s):
    i = _go_ws(s, 0)
    if s[i:i + 1] != b"{":
        end = _go_value_end(s, i, 0)
        if s[i:end] == b"null":
            return Reading(models=[MISSING])
        return Reading(rejected="go: cannot unmarshal a non-object into a struct")
    i = _go_ws(s, i + 1)
    model, type_error = MISSING, None
    if s[i:i + 1] == b"}":
        return Reading(models=[model])
    wanted = go_fold("model")
    while True:
        key, i = _go_string(s, i)
        i = _go_ws(s, i)
        if s[i:i + 1] != b":":
            raise GoSyntaxError("invalid character after object key")
        start = _go_ws(s, i + 1)
        i = _go_value_end(s, start, 1)
        if key == "model" or go_fold(key) == wanted:
            if s[start:start + 1] == b'"':
                model = _go_string(s, start)[0]
            elif s[start:i] != b"null":
                type_error = f"cannot unmarshal {s[start:i][:20]!r} into the model string"
        i = _go_ws(s, i)
        c = s[i:i + 1]
        if c == b",":
            i = _go_ws(s, i + 1)
            continue
        if c == b"}":
            break
        raise GoSyntaxError(f"invalid character {c!r} after object key:value pair")
    # Decode returns the first UnmarshalTypeError after decoding what it could.
    if type_error:
        return Reading(rejected=f"go: {type_error}")
    return Reading(models=[model])


JSON_READERS = {
    "python-json": python_json,
    "orjson": orjson_reader,
    "jiter": jiter_reader,
    "go encoding/json (emulated)": go_json,
}


# ---------------------------------------------------------------- multipart

def starlette_form(body, content_type):
    """Starlette's `Request.form()` (FastAPI's `Form(...)`, vLLM's audio
    endpoints), which parses with python-multipart's MultipartParser and its
    own header handling: the last Content-Disposition header of a part wins,
    names are decoded with the Content-Type's charset."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def read():
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", content_type),
                             (b"content-length", str(len(body)).encode())]}
        request = Request(scope, receive)
        form = await request.form()
        try:
            values = form.getlist("model")
        finally:
            await form.close()
        return values

    try:
        values = asyncio.run(read())
    except Exception as error:  # the server answers 400 (or 500): refused either way
        return _rejected(error)
    texts = [v for v in values if isinstance(v, str)]
    files = len(values) - len(texts)
    return Reading(models=texts, note=f"({files} file part(s) named model)" if files else "")


def python_multipart_form(body, content_type):
    """python-multipart's own high-level `parse_form` (FormParser): it keeps
    a part's headers in a dict (the last of a name wins) and honours
    Content-Transfer-Encoding."""
    fields, files = [], []
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)).encode()}
    try:
        python_multipart.parse_form(
            headers, io.BytesIO(body),
            lambda f: fields.append((f.field_name, f.value)),
            lambda f: files.append(f.field_name))
    except Exception as error:
        return _rejected(error)
    texts = [_text(value) for name, value in fields if name == b"model"]
    named = files.count(b"model")
    return Reading(models=texts, note=f"({named} file part(s) named model)" if named else "")


def _text(value):
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def werkzeug_form(body, content_type):
    """Werkzeug's `parse_form_data` (Flask's `request.form`), strict: an
    error is a refusal. Werkzeug takes the first Content-Disposition header
    of a part, the last of repeated parameters, decodes RFC 2231 names, and
    accepts bare LF or CR line breaks."""
    environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": content_type.decode("latin-1"),
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    try:
        _, form, files = parse_form_data(environ, silent=False)
    except Exception as error:
        return _rejected(error)
    named = len(files.getlist("model"))
    return Reading(models=form.getlist("model"),
                   note=f"({named} file part(s) named model)" if named else "")


MULTIPART_READERS = {
    "starlette": starlette_form,
    "python-multipart": python_multipart_form,
    "werkzeug": werkzeug_form,
}


# ---------------------------------------------------------------- real Go

GO_SOURCE = Path(__file__).parent / "goparse"


def build_go(directory):
    """Builds goparse (standard library only, no network) if `go` is on
    PATH (Debian: golang-go); returns the executable or None."""
    go = shutil.which("go")
    if go is None:
        return None
    exe = Path(directory) / "goparse"
    env = {**os.environ, "GOCACHE": str(Path(directory) / "gocache"), "GOTOOLCHAIN": "local",
           "GOPROXY": "off", "GOFLAGS": "-mod=mod"}
    subprocess.run([go, "build", "-o", str(exe), "."], cwd=GO_SOURCE, env=env, check=True,
                   capture_output=True, timeout=300)
    return exe


def go_readings(exe, items):
    """Real Go's readings of [(kind, content type, body)], in one run:
    {"go encoding/json": Reading} for JSON, {"go mime/multipart": Reading}
    for forms."""
    data = bytearray()
    for kind, content_type, body in items:
        for chunk in (kind.encode(), content_type, body):
            data += struct.pack(">I", len(chunk)) + chunk
    done = subprocess.run([str(exe)], input=bytes(data), capture_output=True, timeout=300, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == len(items), (len(lines), len(items), done.stderr[-500:])
    out = []
    for (kind, _, _), line in zip(items, lines):
        answer = json.loads(line)
        if answer.get("rejected"):
            reading = Reading(rejected=f"go: {answer['rejected'][:80]}")
        elif kind == "json":
            reading = Reading(models=answer["models"] or [MISSING])
        else:
            reading = Reading(models=answer["models"])
        out.append({("go encoding/json" if kind == "json" else "go mime/multipart"): reading})
    return out
