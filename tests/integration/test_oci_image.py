"""deploy/oci-image.sh: the image layout it writes is read by a real OCI
tool (skopeo, Debian), has the shape Istio's and Envoy Gateway's Wasm
fetchers accept (one tar+gzip layer holding plugin.wasm), matches the OCI
image-spec JSON schemas (Debian's golang-github-opencontainers-image-spec-dev),
and is reproducible: the same module gives the same digest."""

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from harness import ROOT, WASM

SCRIPT = ROOT / "deploy" / "oci-image.sh"
IMAGE_SPEC = Path("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema")


def build(out, wasm=WASM, tag="test"):
    result = subprocess.run([str(SCRIPT), "--wasm", str(wasm), "--out", str(out), "--tag", tag],
                            capture_output=True, text=True, timeout=120, check=True)
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    return lines["digest"].strip()


def skopeo(*args):
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is missing: tests/run.sh installs it (apt-get install skopeo)")
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, check=True).stdout


def blob(layout, digest):
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def test_same_module_same_digest_other_module_other_digest(tmp_path):
    first = build(tmp_path / "a")
    second = build(tmp_path / "b")
    assert first == second
    assert sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")) == \
        sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    # A different module (one more byte in a custom section) is another image.
    other = tmp_path / "other.wasm"
    module = WASM.read_bytes()
    other.write_bytes(module + b"\x00\x02\x01x")  # custom section "x", empty
    assert build(tmp_path / "c", other) != first


def test_skopeo_reads_the_layout_and_the_digest_is_the_manifests(tmp_path):
    layout = tmp_path / "image"
    digest = build(layout, tag="0.1.0")
    inspected = json.loads(skopeo("inspect", f"oci:{layout}:0.1.0"))
    assert inspected["Digest"] == digest
    assert (inspected["Os"], inspected["Architecture"]) == ("wasip1", "wasm")
    raw = skopeo("inspect", "--raw", f"oci:{layout}:0.1.0").encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest

    # What a registry push would carry: skopeo copies it with the digest kept.
    copy = tmp_path / "copy"
    skopeo("copy", "--preserve-digests", f"oci:{layout}:0.1.0", f"oci:{copy}:0.1.0")
    index = json.loads((copy / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest
    extracted = tmp_path / "dir"
    skopeo("copy", f"oci:{layout}:0.1.0", f"dir:{extracted}")
    assert json.loads((extracted / "manifest.json").read_text())["layers"][0]["digest"] == \
        json.loads(raw)["layers"][0]["digest"]


def test_layout_is_what_the_wasm_fetchers_accept(tmp_path):
    """Istio's pkg/wasm/imagefetcher.go and Envoy Gateway's copy of it take
    an OCI manifest whose last layer is application/vnd.oci.image.layer.v1.tar+gzip
    and read the file named plugin.wasm from it; the diff_id in the config
    is the tar's digest."""
    layout = tmp_path / "image"
    digest = build(layout)
    manifest = json.loads(blob(layout, digest))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert len(manifest["layers"]) == 1
    layer_descriptor = manifest["layers"][-1]
    assert layer_descriptor["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer = blob(layout, layer_descriptor["digest"])
    assert len(layer) == layer_descriptor["size"]
    tar_bytes = gzip.decompress(layer)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = tar.getnames()
        module = tar.extractfile("plugin.wasm").read()
        member = tar.getmember("plugin.wasm")
    assert names == ["plugin.wasm"]
    assert module == WASM.read_bytes()
    assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]


def test_layout_matches_the_oci_image_spec_schemas(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4
    if not IMAGE_SPEC.is_dir():
        pytest.fail("OCI image-spec schemas missing: tests/run.sh installs "
                    "golang-github-opencontainers-image-spec-dev (Debian)")

    def retrieve(uri):
        # The schemas refer to each other by file name under their own ids.
        return Resource.from_contents(json.loads((IMAGE_SPEC / uri.rsplit("/", 1)[-1]).read_text()),
                                      default_specification=DRAFT4)
    registry = Registry(retrieve=retrieve)

    def check(schema_file, document):
        schema = json.loads((IMAGE_SPEC / schema_file).read_text())
        jsonschema.Draft4Validator(schema, registry=registry).validate(document)

    layout = tmp_path / "image"
    digest = build(layout)
    manifest = json.loads(blob(layout, digest))
    check("image-layout-schema.json", json.loads((layout / "oci-layout").read_text()))
    check("image-index-schema.json", json.loads((layout / "index.json").read_text()))
    check("image-manifest-schema.json", manifest)
    check("config-schema.json", json.loads(blob(layout, manifest["config"]["digest"])))
    with pytest.raises(jsonschema.ValidationError):
        check("image-manifest-schema.json", dict(manifest, schemaVersion=1))
