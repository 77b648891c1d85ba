-- wrk script: the same small chat completion request for every run; a
-- streaming one when BENCH_STREAM is set.
wrk.method = "POST"
if os.getenv("BENCH_STREAM") then
  wrk.body = '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16}'
else
  wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16}'
end
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
