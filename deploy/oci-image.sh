#!/usr/bin/env bash
# Builds the OCI image of the filter that Istio's Wasm fetcher (EnvoyFilter
# ECDS or WasmPlugin) and Envoy Gateway's EnvoyExtensionPolicy pull: an OCI
# image layout directory holding one image whose single layer
# (application/vnd.oci.image.layer.v1.tar+gzip) is a tar with plugin.wasm,
# the "compat" variant of the Wasm image spec that both loaders read.
#
# Reproducible: the same module always gives the same manifest digest. No
# timestamps, owners or host names go in; the tar is written in a fixed form
# and the gzip stream uses stored (uncompressed) deflate blocks, so the
# digest does not depend on this machine's zlib.
#
#   deploy/oci-image.sh [--wasm FILE] [--out DIR] [--tag TAG]
#
# Defaults: the release module target/azure_openai_filter.wasm (built by
# ./wasm-build.sh when missing), target/oci/azure-openai-filter, and the
# crate's version as tag. Prints the manifest digest to pin, and how to push.
set -euo pipefail
cd "$(dirname "$0")/.."

wasm=target/azure_openai_filter.wasm
out=target/oci/azure-openai-filter
tag=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
while [ $# -gt 0 ]; do
  case "$1" in
    --wasm) wasm=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "oci-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ! -f "$wasm" ]; then
  if [ "$wasm" = target/azure_openai_filter.wasm ]; then
    ./wasm-build.sh >&2
  else
    echo "oci-image: no module at $wasm" >&2; exit 2
  fi
fi

python3 - "$wasm" "$out" "$tag" <<'PY'
import hashlib, io, json, os, shutil, struct, sys, tarfile, zlib

wasm_path, out, tag = sys.argv[1:4]
module = open(wasm_path, "rb").read()
if module[:4] != b"\0asm":
    sys.exit(f"oci-image: {wasm_path} is not a Wasm module")

def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

def stored_gzip(data):
    """RFC 1952 gzip of `data` with RFC 1951 stored blocks: no mtime, no
    name, OS unknown; byte for byte the same everywhere."""
    out = bytearray(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
    blocks = [data[i:i + 65535] for i in range(0, len(data), 65535)] or [b""]
    for n, block in enumerate(blocks):
        final = 1 if n == len(blocks) - 1 else 0
        out += bytes([final]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
    out += struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return bytes(out)

tar_buffer = io.BytesIO()
with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    info = tarfile.TarInfo("plugin.wasm")
    info.size, info.mtime, info.mode = len(module), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(module))
layer_tar = tar_buffer.getvalue()
layer = stored_gzip(layer_tar)
assert zlib.decompress(layer, 31) == layer_tar

def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()

config = canonical({
    "architecture": "wasm", "os": "wasip1",
    "config": {},
    "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
})
manifest = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": digest(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest(layer), "size": len(layer),
                "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}],
    "annotations": {"org.opencontainers.image.title": "azure-openai-filter",
                    "org.opencontainers.image.description":
                        "proxy-wasm HTTP filter that turns Envoy into an Azure OpenAI gateway",
                    "org.opencontainers.image.licenses": "Apache-2.0"},
})
index = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": digest(manifest), "size": len(manifest),
                   "annotations": {"org.opencontainers.image.ref.name": tag}}],
})

if os.path.exists(out):
    shutil.rmtree(out)
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs)
for blob in (layer, config, manifest):
    with open(os.path.join(blobs, digest(blob).split(":", 1)[1]), "wb") as f:
        f.write(blob)
with open(os.path.join(out, "oci-layout"), "wb") as f:
    f.write(canonical({"imageLayoutVersion": "1.0.0"}))
with open(os.path.join(out, "index.json"), "wb") as f:
    f.write(index)

print(f"layout:  {out} (OCI image layout, tag {tag})")
print(f"module:  sha256:{hashlib.sha256(module).hexdigest()} ({len(module)} bytes, plugin.wasm)")
print(f"digest:  {digest(manifest)}")
print(f"push:    skopeo copy --preserve-digests oci:{out}:{tag} docker://REGISTRY/azure-openai-filter:{tag}")
print(f"pin:     REGISTRY/azure-openai-filter@{digest(manifest)}")
PY
