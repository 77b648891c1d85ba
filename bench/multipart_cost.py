"""Envoy's CPU for multipart forms of about 7.8 MB: many tiny parts (the
hardening review's case, which once cost a worker 2.7 s), many named parts,
the most parts the filter looks at before the model, and one big part;
through a real Envoy with the built filter and one worker. Envoy's CPU time
is read from /proc before and after each request (best of 3; the kernel's
clock counts in 10 ms steps).

    .venv/bin/python bench/multipart_cost.py"""
import os, sys, time, httpx
sys.path.insert(0, "tests/integration")
import test_hardening as t
from harness import Envoy, RecordingUpstream, bootstrap, cluster, wasm_filter

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

ups = {n: RecordingUpstream(n) for n in ("azure", "v1", "vllm")}
config = {**t.gateway_config(ups), "max_request_body_bytes": 16 * 1024 * 1024}
env = Envoy(bootstrap([wasm_filter(config)], [cluster(n, s.port) for n, s in ups.items()]), concurrency=1)
env.start()
try:
    tiny = b"--b\r\n\r\nxxx\r\n" * 650_000 + b"--b--\r\n"
    named = b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n" * 150_000 + b"--b--\r\n"
    one = (b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-v1\r\n"
           b"--b\r\nContent-Disposition: form-data; name=file; filename=a.mp3\r\nContent-Type: audio/mpeg\r\n\r\n"
           + b"x" * (len(tiny) - 200) + b"\r\n--b--\r\n")
    # The most a form may make the filter look at: 999 named parts of 7.8 KB, then the model.
    filler = b"x" * 7_800
    most = b"".join(b"--b\r\nContent-Disposition: form-data; name=f%d\r\n\r\n" % i + filler + b"\r\n" for i in range(998))
    most += b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-v1\r\n--b\r\nContent-Disposition: form-data; name=file; filename=a.mp3\r\n\r\nx\r\n--b--\r\n"
    for name, body in [("650k tiny parts (no disposition)", tiny), ("150k named parts", named), ("one big part", one), ("999 parts then the model", most)]:
        samples = []
        for _ in range(3):
            before = cpu(env.process.pid); t0 = time.monotonic()
            r = t.post_form(env, body, content_type="multipart/form-data; boundary=b")
            samples.append((cpu(env.process.pid) - before, time.monotonic() - t0, r.status_code))
        print(f"{name}: {len(body)/1e6:.1f} MB, Envoy CPU {min(s[0] for s in samples):.3f} s, wall {min(s[1] for s in samples):.3f} s, status {samples[0][2]}")
finally:
    env.cleanup()
    for s in ups.values(): s.stop()
