-- wrk script for bench case f): POST /mirror with a new image in every request, counting the 202s.
-- The images need not exist (jobs may fail later): only durable enqueues are measured.
-- env: BENCH_TOKEN (bearer token), BENCH_PREFIX (source repository prefix, e.g. 127.0.0.1:9/bench/f1)
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end
function init(args)
  n = 0
  accepted = 0
  other = 0
  first_other = "-"
  token = os.getenv("BENCH_TOKEN")
  prefix = os.getenv("BENCH_PREFIX")
end
function request()
  n = n + 1
  local body = string.format('{"image":"%s/t%d-%d:1"}', prefix, tid, n)
  return wrk.format("POST", "/mirror", {["Content-Type"] = "application/json",
                                        ["Authorization"] = "Bearer " .. token}, body)
end
function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  else
    other = other + 1
    if first_other == "-" then first_other = tostring(status) end
  end
end
function done(summary, latency, requests)
  local a, o, f = 0, 0, "-"
  for _, t in ipairs(threads) do
    a = a + t:get("accepted")
    o = o + t:get("other")
    if f == "-" then f = t:get("first_other") end
  end
  io.write(string.format("ACCEPTED %d OTHER %d DURATION_US %d FIRST_OTHER %s\n", a, o, summary.duration, f))
end
