-- wrk script: GET random paths from a file, optionally with If-None-Match.
-- Usage: wrk ... -s bench/random_paths.lua URL -- PATHS_FILE [inm]
-- PATHS_FILE holds one "path<TAB>etag" per line. Every request is formatted
-- once in init(), so picking one costs wrk a random number and nothing else.
-- done() prints one line "WRK_JSON {...}" that bench/runner.py parses.

local requests_ = {}

function init(args)
  local inm = args[2] == "inm"
  for line in io.lines(args[1]) do
    local path, etag = line:match("^([^\t]+)\t?(.*)$")
    if path then
      local headers = {}
      if inm and etag ~= "" then headers["If-None-Match"] = etag end
      requests_[#requests_ + 1] = wrk.format("GET", path, headers)
    end
  end
  -- Each wrk thread has its own Lua state: seed each differently.
  math.randomseed(os.time() + tonumber(tostring(requests_):match("0x(%x+)") or "0", 16))
end

function request()
  return requests_[math.random(#requests_)]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "bytes": %d, "duration_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
