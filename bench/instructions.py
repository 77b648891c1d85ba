"""Instructions per request of Envoy set-ups, counted by callgrind: nearly
deterministic where CPU time on this shared machine is not, so that small
differences between two builds can be seen. Slow (Envoy and V8 under
valgrind): a few hundred sequential requests per set-up.

    .venv/bin/python bench/instructions.py [--stream] NAME=path/to/filter.wasm ...

Under valgrind a request takes about as long as a tick (1 s), so work the
filter does on its tick (flushing metrics) is counted as if every request
paid it; in real traffic a tick's work is shared by thousands of requests.
To see the cost per request alone, measure a build whose tick does nothing."""
import json, os, subprocess, sys, time, glob, re, tempfile
sys.path.insert(0, "bench"); sys.path.insert(0, "tests/integration")
import httpx
import bench
from harness import Envoy

def measure(name, config, n=300, stream=False):
    up = bench.SseUpstream(None) if stream else bench.start(bench.upstream_config(), None, 1)
    d = tempfile.mkdtemp()
    env = Envoy(config(up.port), concurrency=1, log_level="warn", component_log_level=None)
    env.args[0] = os.path.abspath(".venv/lib/python3.11/site-packages/envoy/_bin/envoy")
    env.args = ["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no",
                f"--callgrind-out-file={d}/cg.out", "--dump-instr=no"] + env.args
    env.start(timeout=240)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 16}
    if stream: body["stream"] = True
    h = {"authorization": f"Bearer {bench.CALLER_KEY}"}
    with httpx.Client(timeout=60) as c:
        for _ in range(50): c.post(env.url + "/v1/chat/completions", json=body, headers=h)
        subprocess.run(["callgrind_control", "-i", "on", str(env.process.pid)], capture_output=True)
        for _ in range(n):
            r = c.post(env.url + "/v1/chat/completions", json=body, headers=h)
            assert r.status_code == 200, r.text
        subprocess.run(["callgrind_control", "-i", "off", str(env.process.pid)], capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(env.process.pid)], capture_output=True)
    time.sleep(1)
    total = 0
    for f in glob.glob(f"{d}/cg.out*"):
        for line in open(f, errors="replace"):
            if line.startswith("summary:") or line.startswith("totals:"):
                total = max(total, int(line.split()[1])); 
    env.cleanup(); up.cleanup()
    print(f"{name}: {total / n / 1000:.1f} k instructions per request", flush=True)

stream = "--stream" in sys.argv
mods = [a for a in sys.argv[1:] if "=" in a]
measure("bare", bench.bare_config, stream=stream)
for m in mods:
    name, path = m.split("=", 1)
    measure(name, lambda port, p=path, l=name.endswith(bench.LIMITED): bench.filter_config(port, p, l),
            stream=stream)
