-- wrk script: GET paths from a file, picked at random or walked in order.
-- Usage: wrk ... -s bench/random_paths.lua URL -- PATHS_FILE [inm] [seq]
-- PATHS_FILE holds one "path<TAB>etag" (or "path") per line.
--   inm: send the line's etag as If-None-Match.
--   seq: walk the lines in order, round and round, instead of picking one at
--        random: the file is then the request list itself (bench/realistic.py
--        writes one drawn with a fixed seed), the same for every system.
-- Every distinct request is formatted once in init(), so choosing one costs
-- wrk a table lookup and nothing else.
-- done() prints one line "WRK_JSON {...}" that bench/runner.py parses.

local requests_ = {}
local walk = false
local next_ = 1
local threads_ = 0

function setup(thread)
  -- Runs once per thread, before its init(): number them.
  threads_ = threads_ + 1
  thread:set("thread_number", threads_)
end

function init(args)
  local inm, formatted = false, {}
  for i = 2, #args do
    if args[i] == "inm" then inm = true end
    if args[i] == "seq" then walk = true end
  end
  for line in io.lines(args[1]) do
    local path, etag = line:match("^([^\t]+)\t?(.*)$")
    if path then
      local key = path .. "\t" .. etag
      local req = formatted[key]
      if req == nil then
        local headers = {}
        if inm and etag ~= "" then headers["If-None-Match"] = etag end
        req = wrk.format("GET", path, headers)
        formatted[key] = req
      end
      requests_[#requests_ + 1] = req
    end
  end
  -- Each thread has its own Lua state: seed each differently, and start each
  -- walk at its own place in the list (a large prime stride apart).
  local number = thread_number or 1
  math.randomseed(os.time() + number * 7919)
  next_ = ((number - 1) * 104729) % #requests_ + 1
end

function request()
  if walk then
    local req = requests_[next_]
    next_ = next_ % #requests_ + 1
    return req
  end
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
