"""Request bodies for the differential test: JSON and multipart shapes on
which parsers are known or likely to disagree, and seeded random mutations
of valid bodies. Each body asks for the allowed alias where the filter reads
it and carries a smuggled `dep-secret` (the forbidden alias's deployment, which
an upstream reading the body would accept) or `secret` (the forbidden alias)
somewhere else.

Deterministic for a seed; the number of cases is bounded by the arguments.
"""

import random
from dataclasses import dataclass

ALLOWED = "allowed"
SMUGGLED = ("dep-secret", "secret")
JSON_CT = b"application/json"


@dataclass
class Case:
    family: str
    kind: str  # "json" or "multipart"
    body: bytes
    content_type: bytes
    label: str = ""


# ---------------------------------------------------------------- JSON

def _obj(*members, sep=b","):
    return b"{" + sep.join(members) + b"}"


def _m(key, value):
    """A member; str values become JSON strings, bytes are written as is."""
    k = key if isinstance(key, bytes) else key.encode()
    if isinstance(value, str):
        v = b'"' + value.encode() + b'"'
    else:
        v = value
    return b'"' + k + b'":' + v


REAL = _m("model", ALLOWED)
INPUT = _m("input", "hi")


def _placed(smuggle, where):
    """The smuggled member after, before, or instead of the real model."""
    if where == "after":
        return _obj(REAL, INPUT, smuggle)
    if where == "before":
        return _obj(smuggle, INPUT, REAL)
    return _obj(INPUT, smuggle)


WHERE = ("after", "before", "alone")


def json_cases(rng, mutations):
    cases = []

    def add(family, body, label=""):
        cases.append(Case(family, "json", body, JSON_CT, label))

    # Plain valid bodies: every parser must read them (the harness works).
    for body in [_obj(REAL, INPUT), b'{\n  "input": "hi",\n  "model": "allowed"\n}\n',
                 _obj(REAL, _m("messages", b'[{"role":"user","content":"caf\xc3\xa9 \\u00e9"}]'))]:
        add("baseline", body)

    # Keys equal to `model` ignoring case (Go's encoding/json, .NET's web defaults).
    keys = ["Model", "MODEL", "mOdEl", "moDEL", "modeL", "MODEl"]
    keys += ["".join(c.upper() if rng.random() < 0.5 else c for c in "model") or "MODEL"
             for _ in range(3)]
    for key in keys:
        for value in SMUGGLED:
            for where in WHERE:
                add("json-key-case", _placed(_m(key, value), where), f"{key} {where}")

    # Escaped keys: the same key written with \u escapes, and escaped case variants.
    for key in [r"mod\u0065l", r"\u006dodel", r"\u006d\u006f\u0064\u0065\u006c", r"mo\u0064el",
                r"mode\u006c"]:
        for where in WHERE:
            add("json-key-escaped", _placed(_m(key, "dep-secret"), where), f"{key} {where}")
    for key in [r"\u004dODEL", r"M\u004fDEL", r"\u004d\u006fdel", r"mode\u004c"]:
        for value in SMUGGLED:
            for where in WHERE:
                add("json-key-escaped-case", _placed(_m(key, value), where), f"{key} {where}")
    add("json-key-escaped", _obj(_m(r"mod\u0065l", ALLOWED), _m("model", "dep-secret")))

    # Exact duplicates.
    for value in SMUGGLED:
        add("json-duplicate", _obj(REAL, _m("model", value)))
        add("json-duplicate", _obj(_m("model", value), REAL))
        add("json-duplicate", _obj(REAL, INPUT, REAL, _m("model", value)))
        add("json-duplicate", b'{ "model" : "allowed" ,\n\t"model"\n:\n"' + value.encode() + b'" }')
        add("json-duplicate", _obj(REAL, _m("MODEL", value), _m("model", ALLOWED)))

    # Nested `model` keys (the top level decides; nothing may leak from inside).
    for value in SMUGGLED:
        for nested in [_m("metadata", _obj(_m("model", value))),
                       _m("tools", b"[" + _obj(_m("model", value)) + b"]"),
                       _m("input", b"[" + _obj(_m("MODEL", value)) + b"]"),
                       _m("x", _obj(_m("y", _obj(_m("model", value))))),
                       _m("text", '\\"model\\":\\"' + value + '\\"')]:
            add("json-nested", _obj(REAL, nested))
            add("json-nested", _obj(nested, REAL))
            add("json-nested", _obj(nested, INPUT))

    # `model` null, and non-string models next to case variants.
    add("json-null", _obj(_m("model", b"null"), INPUT))
    add("json-null", _obj(_m("model", b"null"), _m("MODEL", "dep-secret")))
    add("json-null", _obj(_m("MODEL", "dep-secret"), _m("model", b"null")))
    add("json-null", _obj(REAL, _m("Model", b"null")))
    add("json-null", _obj(_m("Model", b"null"), REAL))
    add("json-null", _obj(_m("model", b"null"), _m("model", ALLOWED)))
    for value in [b"1", b"-0", b"true", b"false", b"[]", b"{}", b'["allowed"]', b'{"model":"allowed"}',
                  b'["dep-secret"]', b"1e400"]:
        add("json-non-string", _obj(_m("model", value), INPUT))
        add("json-non-string", _obj(REAL, _m("MODEL", value)))

    # Whitespace: JSON's four, and others some readers might skip.
    for ws, name in [(b" ", "space"), (b"\t", "tab"), (b"\n", "lf"), (b"\r", "cr"),
                     (b"\x0c", "ff"), (b"\x0b", "vt"), (b"\x00", "nul"), (b"\xc2\xa0", "nbsp"),
                     (b"\xe2\x80\xa8", "u2028"), (b"\x1c", "fs")]:
        s = _m("MODEL", "dep-secret")
        add("json-whitespace", ws + _obj(REAL, INPUT) + ws, f"{name} around")
        add("json-whitespace", b"{" + ws + b'"model"' + ws + b":" + ws + b'"allowed"' + ws + b"}",
            f"{name} inside")
        add("json-whitespace", _obj(REAL, ws + _m("metadata", _obj(s))), f"{name} before nested MODEL")
        add("json-whitespace", b'{"model":"allowed",' + ws + b'"model":"dep-secret"}',
            f"{name} before a duplicate")

    # Byte order marks and other encodings of the whole body.
    plain = _obj(REAL, INPUT)
    add("json-bom", b"\xef\xbb\xbf" + plain, "utf-8 bom")
    add("json-bom", b"\xef\xbb\xbf" + _obj(REAL, _m("MODEL", "dep-secret")), "utf-8 bom + MODEL")
    add("json-bom", plain + b"\xef\xbb\xbf", "trailing bom")
    add("json-bom", b'{"\xef\xbb\xbfmodel":"dep-secret","model":"allowed"}', "bom in a key")
    add("json-bom", b"\xff\xfe" + plain.decode().encode("utf-16-le"), "utf-16le bom")
    add("json-bom", plain.decode().encode("utf-16-le"), "utf-16le")
    add("json-bom", plain.decode().encode("utf-16-be"), "utf-16be")
    add("json-bom", plain.decode().encode("utf-32-le"), "utf-32le")

    # Invalid UTF-8 in strings (and keys), overlong forms, encoded surrogates.
    bad = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf",
           b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xff", b"\xfe", b"\xc3",
           b"\xe2\x82", b"\xc0\xa2", b"\xc0\x80", b"\xc1\xa5"]
    for seq in bad:
        label = seq.hex()
        add("json-invalid-utf8", _obj(REAL, b'"input":"a' + seq + b'b"'), f"{label} in a value")
        add("json-invalid-utf8", _obj(REAL, b'"meta":{"k' + seq + b'":1}'), f"{label} in a nested key")
        add("json-invalid-utf8", _obj(REAL, b'"x' + seq + b'":"dep-secret"'), f"{label} in a key")
        add("json-invalid-utf8", _obj(b'"mod' + seq + b'l":"dep-secret"', REAL), f"{label} in model key")
        add("json-invalid-utf8", _obj(b'"model":"allowed' + seq + b'"', INPUT), f"{label} in the model")
        add("json-invalid-utf8", _obj(REAL, INPUT)[:-1] + seq + b"}",
            f"{label} at the end")
    # An overlong quote (C0 A2) that a lenient decoder would turn into '"'.
    q = b"\xc0\xa2"
    add("json-invalid-utf8", _obj(REAL, b'"x":"v' + q + b"," + q + b"model" + q + b":" + q + b'dep-secret"'),
        "overlong quotes spelling a model member")
    add("json-invalid-utf8", _obj(REAL, b'"x":"v' + q + b"," + q + b"MODEL" + q + b":" + q + b'dep-secret"'),
        "overlong quotes spelling a MODEL member")

    # Lone surrogate escapes.
    for esc in [r"\ud800", r"\udfff", r"\ud800\u0041", r"\udc00\ud800", r"\ud83d\ude00", r"\ud800\\"]:
        add("json-surrogate", _obj(REAL, _m("input", "a" + esc)), f"{esc} in a value")
        add("json-surrogate", _obj(REAL, _m("k" + esc, "dep-secret")), f"{esc} in a key")
        add("json-surrogate", _obj(_m("model" + esc, "dep-secret"), REAL), f"{esc} after model")
        add("json-surrogate", _obj(_m(esc + "MODEL", "dep-secret"), REAL), f"{esc} before MODEL")
        add("json-surrogate", _obj(_m("model", ALLOWED + esc), INPUT), f"{esc} in the model")

    # Numbers: huge, tiny, long, and not-quite numbers.
    for number in [b"1e999999", b"-1e999999", b"123456789012345678901234567890123456789", b"1.5e-400",
                   b"-0", b"0." + b"0" * 400 + b"1", b"1E+2", b"01", b"1.", b".5", b"+1", b"0x10", b"1e",
                   b"-", b"1_000"]:
        add("json-number", _obj(REAL, _m("n", number)), number[:12].decode())
        add("json-number", _obj(_m("n", number), REAL, _m("model", "dep-secret")), number[:12].decode())

    # Deep nesting, in arrays and objects, before and after the model.
    for depth in [100, 900, 1100, 5000, 10001, 20000]:
        arrays = b"[" * depth + b"]" * depth
        objects = b'{"a":' * depth + b"1" + b"}" * depth
        for name, deep in [("arrays", arrays), ("objects", objects)]:
            add("json-deep", _obj(REAL, _m("d", deep)), f"{depth} {name} after")
            add("json-deep", _obj(_m("d", deep), REAL, _m("model", "dep-secret")), f"{depth} {name} before")

    # Trailing bytes after the object (Go's Decoder reads only the first value).
    for tail in [b" x", b"}", b'{"model":"dep-secret"}', b' {"MODEL":"dep-secret"}', b"\x00", b"\n\n",
                 b",", b"]", b"null", b"//c", b"/*c*/", b'\n{"model":"secret"}']:
        add("json-trailing", _obj(REAL, INPUT) + tail, repr(tail)[:20])

    # Comments.
    for comment in [b"/*c*/", b"// c\n", b"# c\n", b'/*"model":"dep-secret"*/']:
        add("json-comment", b"{" + comment + REAL + b"," + INPUT + b"}")
        add("json-comment", b"{" + REAL + b"," + comment + _m("MODEL", "dep-secret") + b"}")

    # NaN and infinities.
    for value in [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"undefined"]:
        add("json-nan", _obj(REAL, _m("t", value)), value.decode())
        add("json-nan", _obj(_m("model", value), INPUT), value.decode())

    # Keys that look like `model` but are not, to any reader in use.
    for key in ["\uff4dodel", "mode\u0131", "mod\u0435l", " model", "model ", "MODEL\u200b", "\u212aMODEL",
                "modeł", "model\\u0000"]:
        add("json-near-miss", _obj(REAL, _m(key, "dep-secret")), key.encode("unicode_escape").decode())

    # Random mutations of valid bodies that hold a smuggled value elsewhere.
    templates = [
        _obj(REAL, INPUT, _m("metadata", _obj(_m("model", "dep-secret")))),
        _obj(_m("input", '\\"model\\":\\"dep-secret\\"'), REAL),
        _obj(REAL, _m("modex", "dep-secret"), _m("messages", b'[{"role":"user","content":"hi"}]')),
        _obj(_m("tools", b'[{"model":"secret"}]'), REAL, _m("Xodel", "dep-secret")),
        b'{"model" : "allowed" , "a" : [1, 2.5e3, true, null, "dep-secret"]}',
        _obj(_m("odel", "dep-secret"), REAL),
        _obj(REAL, _m("MODE", "dep-secret")),
        _obj(REAL, _m("m", "dep-secret"), _m("odel", "secret")),
        _obj(REAL, _m("input", "dep-secret"), _m("x", b'"mod\\u0065l"')),
    ]
    for n in range(mutations):
        template = templates[n % len(templates)]
        body, ops = mutate(rng, template, JSON_TOKENS)
        add("json-mutation", body, ops)
    return cases


JSON_TOKENS = [b'"', b"\\", b",", b":", b"{", b"}", b"[", b"]", b"M", b"m", b"L", b" ", b"\n", b"\x00",
               b"\xff", b"\xc0", b"\xef\xbb\xbf", b"\\u", b"\\u0065", b'"model":"dep-secret",',
               b'"MODEL":"dep-secret",', b"null", b"1e9", b"/*", b"*/"]


def mutate(rng, body, tokens):
    """1 to 3 random edits of `body`: byte flips, token or byte insertions,
    deletions, duplicated slices, letter case swaps."""
    data = bytearray(body)
    ops = []
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        kind = rng.choice(["flip", "token", "insert", "delete", "dup", "case", "token"])
        if kind == "flip" and at < len(data):
            data[at] = rng.randrange(256)
        elif kind == "token":
            token = rng.choice(tokens)
            data[at:at] = token
        elif kind == "insert":
            data[at:at] = bytes([rng.randrange(256)])
        elif kind == "delete":
            del data[at:at + rng.randint(1, 3)]
        elif kind == "dup":
            end = min(len(data), at + rng.randint(1, 24))
            data[end:end] = data[at:end]
        elif kind == "case":
            letters = [i for i, b in enumerate(data) if chr(b).isalpha() and b < 128]
            if letters:
                i = rng.choice(letters)
                data[i] = ord(chr(data[i]).swapcase())
        ops.append(f"{kind}@{at}")
    return bytes(data), " ".join(ops)


# ---------------------------------------------------------------- multipart

B = b"----differential7MA4YWxkTrZu0gW"
CRLF = b"\r\n"


def ct(boundary=B, extra=b""):
    return b"multipart/form-data; boundary=" + boundary + extra


def cd(params):
    return b"Content-Disposition: form-data; " + params


MODEL_PART = ([cd(b'name="model"')], ALLOWED.encode())
FILE_PART = ([cd(b'name="file"; filename="a.wav"'), b"Content-Type: audio/wav"],
             b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00data\x00\x00\x00\x00")
TEXT_PART = ([cd(b'name="response_format"')], b"json")


def form(parts, boundary=B, nl=CRLF, preamble=b"", epilogue=CRLF, close=True):
    """A multipart body: parts are (header lines, content)."""
    out = preamble
    for headers, content in parts:
        out += b"--" + boundary + nl + b"".join(h + nl for h in headers) + nl + content + nl
    if close:
        out += b"--" + boundary + b"--" + epilogue
    return out


def smuggle_part(headers, value="dep-secret"):
    return (headers, value.encode())


def multipart_cases(rng, mutations):
    cases = []

    def add(family, body, content_type=None, label=""):
        cases.append(Case(family, "multipart", body, content_type or ct(), label))

    def both(family, headers, label=""):
        """A smuggling part before and after the real model part, and alone
        (the Azure-style route adds a model field to a form without one)."""
        for value in SMUGGLED[:1]:
            s = smuggle_part(headers, value)
            add(family, form([MODEL_PART, FILE_PART, s]), label=f"{label} after")
            add(family, form([s, MODEL_PART, FILE_PART]), label=f"{label} before")
            add(family, form([FILE_PART, s]), label=f"{label} alone")

    def as_real(family, headers, label=""):
        """The real model field written this way (does the filter's model
        field stay the one every parser reads?)."""
        add(family, form([(headers, ALLOWED.encode()), FILE_PART]), label=f"{label} as the model part")

    # Plain valid forms: every parser must read them (the harness works).
    add("baseline", form([MODEL_PART, FILE_PART]))
    add("baseline", form([FILE_PART, TEXT_PART, MODEL_PART]))
    add("baseline", form([([b'content-disposition: form-data; name=model'], b"allowed")], boundary=b"x"),
        ct(b"x"))

    # Several Content-Disposition headers in one part.
    for first, second, label in [
        (cd(b'name="note"'), cd(b'name="model"'), "note then model"),
        (cd(b'name="model"'), cd(b'name="note"'), "model then note"),
        (cd(b'name="note"'), b'content-disposition: form-data; name="model"', "lower-case second"),
        (cd(b'name="note"'), b'CONTENT-DISPOSITION: form-data; name=model', "upper-case second"),
        (cd(b'name="file"; filename="x"'), cd(b'name="model"'), "file then model"),
        (cd(b'name="model"'), cd(b'name="model"; filename="x"'), "model then model file"),
    ]:
        both("mp-multi-disposition", [first, second], label)
        both("mp-multi-disposition", [first, b"Content-Type: text/plain", second], label + " (apart)")
        as_real("mp-multi-disposition", [first, second], label)

    # Several `name` parameters in one disposition.
    for params in [b'name="note"; name="model"', b"name=note; name=model", b'name="model"; name="note"',
                   b'name="note"; NAME="model"', b'name="note";name="model"', b'name="note"; name=model; x=y',
                   b'name=""; name="model"', b'name="note"; Name=model']:
        both("mp-multi-name", [cd(params)], params.decode())
        as_real("mp-multi-name", [cd(params)], params.decode())

    # RFC 2231 / 5987 extended and continued parameters.
    for params in [b"name*=UTF-8''model", b"name*=utf-8''mo%64el", b"name*=''model", b"name*0=mo; name*1=del",
                   b'name*0="mo"; name*1="del"', b"name*0*=UTF-8''mo; name*1=del",
                   b"name=\"note\"; name*=UTF-8''model", b"name*=UTF-8''model; name=\"note\"",
                   b'name="note"; name*0=mo; name*1=del', b"name*=UTF-8''%6dodel",
                   b"name=\"model\"; name*=UTF-8''note", b"name*=UTF-8''note; name=\"model\""]:
        both("mp-rfc2231", [cd(params)], params.decode())
        as_real("mp-rfc2231", [cd(params)], params.decode())

    # Parameter name case.
    for params in [b'NAME="model"', b"Name=model", b'nAmE="model"']:
        both("mp-param-case", [cd(params)], params.decode())
        as_real("mp-param-case", [cd(params)], params.decode())

    # Spaces around `=` and inside values.
    for params in [b'name = "model"', b'name= "model"', b'name ="model"', b'name=" model"', b'name="model "',
                   b"name=model ", b"name =model", b"name\t=\tmodel", b'name="model"  ;', b' name="model"']:
        both("mp-spaces", [cd(params)], params.decode())
        as_real("mp-spaces", [cd(params)], params.decode())

    # Quoting, escapes, angle brackets, percent-encoded quotes.
    for params in [b"name=model", b"name='model'", b'name="model', b'name=mo"del"', b'name="mo"del',
                   b'name=""model""', b'name="model"x', b"name=<model>", b'name="<model>"', b"name=%22model%22",
                   b'name="mo\\del"', b'name="mo\\\\del"', b'name="model\\\\"', b'name="\\m\\o\\d\\e\\l"',
                   b'name="model\\""', b'name="a\\"; name=model"', b'name="a\\\\"; name=model',
                   b'name="mo%22del"', b'name=mod\\el']:
        both("mp-quoting", [cd(params)], params.decode())
        as_real("mp-quoting", [cd(params)], params.decode())

    # Semicolons inside and around quoted values.
    for params in [b'name="x;name=model"', b'name="model;"', b'name="mo;del"', b'name="x"; ;name=model',
                   b'name="model";', b';name="model"', b'filename="a;b"; name="model"']:
        both("mp-semicolon", [cd(params)], params.decode())
        as_real("mp-semicolon", [cd(params)], params.decode())

    # Dispositions other than form-data.
    for disposition in [b'attachment; name="model"', b"inline; name=model", b"file; name=model",
                        b"form-data-x; name=model", b"FORM-DATA; name=model", b"Form-Data; name=model",
                        b"; name=model", b"name=model", b"form-data name=model", b"form-data,name=model",
                        b'"form-data"; name=model', b"form-data ; name=model", b"  form-data; name=model",
                        b"form-data;; name=model", b"attachment; filename=x; name=model"]:
        headers = [b"Content-Disposition: " + disposition]
        both("mp-disposition-type", headers, disposition.decode())
        as_real("mp-disposition-type", headers, disposition.decode())

    # Obsolete header folding.
    for headers in [[b"Content-Disposition: form-data;", b' name="model"'],
                    [b"Content-Disposition: form-data;", b'\tname="model"'],
                    [cd(b'name="note"'), b' ; name="model"'],
                    [b"Content-Disposition:", b' form-data; name="model"'],
                    [b"X-Other: a", b' Content-Disposition: form-data; name="model"'],
                    [b' Content-Disposition: form-data; name="model"']]:
        both("mp-folding", headers, repr(b"|".join(headers))[2:40])
        as_real("mp-folding", headers, repr(b"|".join(headers))[2:40])

    # Bare LF or CR line ends: whole forms, part headers, and delimiters
    # hidden in a file part that LF-tolerant parsers see as parts.
    for nl, name in [(b"\n", "lf"), (b"\r", "cr"), (b"\n\r", "lfcr")]:
        add("mp-line-ends", form([MODEL_PART, FILE_PART], nl=nl), label=f"whole form {name}")
        add("mp-line-ends", form([MODEL_PART, FILE_PART, smuggle_part([cd(b'name="model"')])], nl=nl),
            label=f"whole form {name} with a second model")
        for hidden_nl in [nl, CRLF]:
            hidden = (b"AAA" + nl + b"--" + B + hidden_nl + cd(b'name="model"') + hidden_nl + hidden_nl
                      + b"dep-secret")
            file_part = (FILE_PART[0], hidden)
            add("mp-line-ends", form([file_part, MODEL_PART]), label=f"{name} delimiter in a file, before")
            add("mp-line-ends", form([MODEL_PART, file_part]), label=f"{name} delimiter in a file, after")
            add("mp-line-ends", form([file_part]), label=f"{name} delimiter in a file, alone")
        add("mp-line-ends", form([([cd(b'name="note"') + nl + cd(b'name="model"')], b"dep-secret"),
                                  MODEL_PART]), label=f"{name} between two dispositions")
        add("mp-line-ends", form([([cd(b'name="model"') + nl + b"X: y"], b"allowed"), FILE_PART]),
            label=f"{name} inside the model part's headers")
        add("mp-line-ends", form([MODEL_PART]).replace(b"\r\n\r\nallowed", b"\r\n" + nl + b"allowed"),
            label=f"{name} ending the model part's headers")

    # Parts without a disposition.
    for headers in [[b"Content-Type: text/plain"], [], [b"X-Name: model"], [b"Content-Dispositions: name=model"]]:
        both("mp-no-disposition", headers, repr(headers)[:30])

    # Preamble and epilogue text.
    hidden_form = form([smuggle_part([cd(b'name="model"')])])
    for preamble in [b"preamble\r\n", b"x" + hidden_form + b"\r\n", b"x\n" + hidden_form,
                     b"--" + B + b"x\r\n", b"\r\n"]:
        add("mp-preamble-epilogue", form([MODEL_PART, FILE_PART], preamble=preamble), label=repr(preamble[:20]))
    for epilogue in [b"", b"\r\n" + hidden_form, b"\r\nepilogue", b"--\r\n", b" \r\n" + hidden_form,
                     b"\n" + hidden_form]:
        add("mp-preamble-epilogue", form([MODEL_PART, FILE_PART], epilogue=epilogue),
            label="epilogue " + repr(epilogue[:20]))
    add("mp-preamble-epilogue", form([MODEL_PART, FILE_PART], close=False), label="no closing delimiter")
    add("mp-preamble-epilogue", form([MODEL_PART, FILE_PART], close=False) + b"--" + B + b"-\r\n",
        label="closing with one dash")

    # Header name case and spacing.
    for name in [b"content-disposition :", b"Content-Disposition\t:", b"CONTENT-DISPOSITION:",
                 b"Content-Disposition:", b"Content-Disposition ::", b"Content_Disposition:",
                 b"Content-Disposition\x00:", b"Content-Dispositio:", b"Content-Disposition;:"]:
        for params in [b' form-data; name="model"', b"form-data;name=model"]:
            both("mp-header-name", [name + params], (name + params).decode("latin-1"))
            as_real("mp-header-name", [name + params], (name + params).decode("latin-1"))

    # Content-Type: two boundaries, extended boundaries, quoting, case, charset.
    A = b"AaB03xfilter"
    hidden = form([smuggle_part([cd(b'name="model"')])], boundary=B)  # what B-readers see
    visible = form([MODEL_PART, FILE_PART], boundary=A)  # what A-readers see
    inside = form([MODEL_PART, (FILE_PART[0], b"\r\n" + hidden)], boundary=A)
    for content_type in [b"multipart/form-data; boundary=" + A + b"; boundary=" + B,
                         b"multipart/form-data; boundary=\"" + A + b"\"; boundary=" + B,
                         b"multipart/form-data; boundary=" + A + b"; BOUNDARY=" + B,
                         b"multipart/form-data; boundary=" + A + b"; boundary*=UTF-8''" + B,
                         b"multipart/form-data; boundary*=UTF-8''" + B + b"; boundary=" + A,
                         b"multipart/form-data; boundary=" + A + b"; boundary*0=" + B,
                         b"multipart/form-data; boundary=" + A + b";boundary=" + B,
                         b"multipart/form-data; boundary=" + A + b", boundary=" + B,
                         b"multipart/form-data; boundary=" + A + b"; charset=utf-8; boundary=" + B]:
        add("mp-content-type", hidden + visible, content_type, repr(content_type[20:])[:60] + " B-form first")
        add("mp-content-type", inside, content_type, repr(content_type[20:])[:60] + " B-form in a file")
        add("mp-content-type", visible + hidden, content_type, repr(content_type[20:])[:60] + " B-form last")
    for content_type, boundary in [
        (b'multipart/form-data; boundary="' + A + b'"', A),
        (b'multipart/form-data; boundary="a b"', b"a b"),
        (b'multipart/form-data; boundary="a\\"b"', b'a"b'),
        (b'multipart/form-data; boundary="a\\"b"', b'a\\"b'),
        (b'multipart/form-data; boundary=" ' + A + b'"', A),
        (b'multipart/form-data; boundary=" ' + A + b'"', b" " + A),
        (b"MULTIPART/FORM-DATA; BOUNDARY=" + A, A),
        (b"multipart/form-data; boundary=" + A.upper(), A),
        (b"multipart/form-data; boundary=" + A + b";", A),
        (b"multipart/form-data;boundary=" + A, A),
        (b"multipart/form-data; boundary = " + A, A),
        (b"multipart/form-data; boundary=" + A + b"; boundary=" + A, A),
    ]:
        add("mp-content-type", form([MODEL_PART, FILE_PART], boundary=boundary), content_type,
            repr(content_type[20:])[:50] + " / " + repr(boundary))

    # Delimiter lines: transport padding, dashes.
    for delimiter_tail, name in [(b" ", "space"), (b"\t", "tab"), (b"  \t ", "mixed")]:
        body = form([MODEL_PART, FILE_PART]).replace(b"--" + B + CRLF, b"--" + B + delimiter_tail + CRLF)
        add("mp-delimiter", body, label=f"{name} after every delimiter")
        hidden = (b"AAA\r\n--" + B + delimiter_tail + CRLF + cd(b'name="model"') + CRLF + CRLF + b"dep-secret")
        add("mp-delimiter", form([(FILE_PART[0], hidden), MODEL_PART]),
            label=f"{name}-padded delimiter in a file, before")
        add("mp-delimiter", form([MODEL_PART, (FILE_PART[0], hidden)]),
            label=f"{name}-padded delimiter in a file, after")
    for weird in [b"---" + B, b"--" + B + b"-", b"--" + B + b"x", b"-- " + B]:
        hidden = b"AAA\r\n" + weird + CRLF + cd(b'name="model"') + CRLF + CRLF + b"dep-secret"
        add("mp-delimiter", form([(FILE_PART[0], hidden), MODEL_PART]), label=repr(weird[:8]))

    # Content-Transfer-Encoding (python-multipart's FormParser decodes it).
    for encoding in [b"base64", b"quoted-printable", b"BASE64"]:
        headers = [cd(b'name="model"'), b"Content-Transfer-Encoding: " + encoding]
        add("mp-transfer-encoding", form([(headers, ALLOWED.encode()), FILE_PART]), label=encoding.decode())
        add("mp-transfer-encoding", form([MODEL_PART, smuggle_part(
            [cd(b'name="note"'), b"Content-Transfer-Encoding: " + encoding], "ZGVwLXNlY3JldA==")]),
            label=encoding.decode() + " on another part")

    # A charset in the Content-Type (Starlette decodes names and values with it).
    for charset in ["utf-16-le", "cp037", "utf-7", "utf-16", "utf-32"]:
        encoded_name = "model".encode(charset)
        if charset == "utf-7":
            encoded_name = b"+AG0-odel"
        part = ([b'Content-Disposition: form-data; name="' + encoded_name + b'"'], "dep-secret".encode(charset))
        content_type = ct(extra=b"; charset=" + charset.encode())
        add("mp-charset", form([MODEL_PART, FILE_PART, part]), content_type, charset + " name after")
        add("mp-charset", form([part, MODEL_PART, FILE_PART]), content_type, charset + " name before")
        add("mp-charset", form([FILE_PART, part]), content_type, charset + " name alone")

    # A `model` part with a filename (a file, not a field, to form parsers).
    for params in [b'name="model"; filename="m.txt"', b'name="model"; filename=""',
                   b"name=\"model\"; filename*=UTF-8''m.txt", b'filename="m.txt"; name="model"']:
        as_real("mp-filename", [cd(params)], params.decode())
        both("mp-filename", [cd(params)], params.decode())

    # Field names differing from `model` only by case or padding.
    for name in [b"Model", b"MODEL", b"model ", b" model", b"model\x00", b"mod\xc3\xa9l"]:
        both("mp-field-name-case", [cd(b'name="' + name + b'"')], name.decode("latin-1"))

    # Random mutations of valid forms with a model-like part hidden in a file.
    near = [
        b"AAA\r\n--" + B + b"x\r\n" + cd(b'name="model"') + b"\r\n\r\ndep-secret",
        b"AAA\n--" + B + b"\n" + cd(b'name="model"') + b"\n\ndep-secret",
        b"AAA\r\n-" + B + b"\r\n" + cd(b'name="model"') + b"\r\n\r\ndep-secret",
        b"AAA\r\n--" + B + b"\r\n" + cd(b'name="modex"') + b"\r\n\r\ndep-secret",
    ]
    templates = []
    for content in near:
        file_part = (FILE_PART[0], content)
        templates.append(form([MODEL_PART, file_part, TEXT_PART]))
        templates.append(form([file_part, MODEL_PART]))
    templates.append(form([([cd(b'name="note"'), b"X-A: " + cd(b'name="model"')], b"dep-secret"),
                           MODEL_PART, FILE_PART]))
    templates.append(form([([cd(b'name="note"; x="name=model"')], b"dep-secret"), MODEL_PART, FILE_PART]))
    tokens = [b"\r\n", b"\n", b"\r", b"--", b"--" + B, b";", b'"', b"\\", b"name=model; ", b" ", b"\t",
              b"Content-Disposition: form-data; name=model\r\n", b"*", b"=", b"M"]
    for n in range(mutations):
        body, ops = mutate(rng, templates[n % len(templates)], tokens)
        add("mp-mutation", body, label=ops)
    return cases


def all_cases(seed, json_mutations, multipart_mutations):
    rng = random.Random(seed)
    return json_cases(rng, json_mutations) + multipart_cases(rng, multipart_mutations)
