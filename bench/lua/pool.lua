-- POST one distinct pre-made form body per request, read from a pool file (one body a line);
-- when the pool is used up the thread stops: a body is never sent twice (a refresh token or
-- a code spent twice would trip reuse detection).
--   wrk ... -s pool.lua URL -- POOL_FILE [THREADS]
--   BENCH_PATH (/v1/oauth/token), BENCH_HEADERS, BENCH_HOST
--   BENCH_CAPTURE_FILE: write each answer's refresh_token, prefixed with BENCH_CAPTURE_PREFIX,
--   to BENCH_CAPTURE_FILE.<thread> (the next scenario's pool)
package.path = "./?.lua;" .. package.path
local common = require("common")

local path = os.getenv("BENCH_PATH") or "/v1/oauth/token"
local headers = common.headers({ ["Content-Type"] = "application/x-www-form-urlencoded" })
local capture_file = os.getenv("BENCH_CAPTURE_FILE")
local capture_prefix = os.getenv("BENCH_CAPTURE_PREFIX") or ""

setup = common.setup
done = common.done

local mine = {}
local idx = 0
local out = nil
local idle = nil

function init(args)
  local nthreads = tonumber(args[2] or "1")
  local n = 0
  for line in io.lines(args[1]) do
    if #line > 0 then
      if n % nthreads == tid then mine[#mine + 1] = line end
      n = n + 1
    end
  end
  if #mine == 0 then error("empty pool " .. args[1]) end
  if capture_file and #capture_file > 0 then
    out = assert(io.open(capture_file .. "." .. tid, "w"))
  end
  -- What a stopping thread returns instead of a spent body: harmless if it is ever sent.
  idle = wrk.format("GET", "/healthz", { Host = headers["Host"] })
end

function request()
  if started == 0 then started = common.now() end
  idx = idx + 1
  local body = mine[idx]
  if body == nil then
    if exhausted == 0 then
      exhausted = 1
      stopped_at = common.now()
    end
    wrk.thread:stop()
    return idle
  end
  return wrk.format("POST", path, headers, body)
end

if capture_file and #capture_file > 0 then
  function response(status, _, body)
    if status == 200 and body then
      local token = body:match('"refresh_token":"([^"]+)"')
      if token then
        out:write(capture_prefix, token, "\n")
        out:flush()
        captured = captured + 1
      end
    end
  end
end
