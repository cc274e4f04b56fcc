-- Shared by the bench's wrk scripts: a monotonic clock (LuaJIT FFI), headers from the
-- environment, thread bookkeeping and one machine-readable RESULT line at the end.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]

local M = {}
local ts = ffi.new("bench_timespec")

function M.now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

-- BENCH_HEADERS: "Name: value" lines; BENCH_HOST sets Host (wrk connects to the URL's address).
function M.headers(into)
  local raw = os.getenv("BENCH_HEADERS") or ""
  for line in raw:gmatch("[^\n]+") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    if name then into[name] = value end
  end
  local host = os.getenv("BENCH_HOST")
  if host and #host > 0 then into["Host"] = host end
  return into
end

local threads = {}
local next_id = 0
function M.setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

-- Per-thread state read back by done(); scripts update these globals.
started = 0
stopped_at = 0
exhausted = 0
captured = 0

function M.done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local first, last, all_exhausted, ex, cap = nil, 0, #threads > 0, 0, 0
  for _, th in ipairs(threads) do
    local s = th:get("started") or 0
    local e = th:get("exhausted") or 0
    local stop = th:get("stopped_at") or 0
    if s > 0 and (first == nil or s < first) then first = s end
    if e == 0 then all_exhausted = false else ex = ex + 1 end
    if stop > last then last = stop end
    cap = cap + (th:get("captured") or 0)
  end
  -- With every thread stopped early (pool used up), the load ran only until the last stop.
  local window = secs
  if all_exhausted and first ~= nil and last > first then window = last - first end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_s=%.3f window_s=%.3f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f non2xx=%d connect_err=%d read_err=%d write_err=%d timeouts=%d exhausted=%d captured=%d\n",
    summary.requests, secs, window,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.status, e.connect, e.read, e.write, e.timeout, ex, cap))
end

return M
