-- The soak's mix, through the gateway: an authenticated API read, then a client_credentials
-- grant, alternately.
--   BENCH_HOST, BENCH_BEARER (access token), BENCH_API_PATH, BENCH_BASIC (client auth),
--   BENCH_CC_BODY
package.path = "./?.lua;" .. package.path
local common = require("common")

setup = common.setup
done = common.done

local host = os.getenv("BENCH_HOST")
local api = wrk.format("GET", os.getenv("BENCH_API_PATH") or "/api/v1/courses",
  { Host = host, Authorization = "Bearer " .. os.getenv("BENCH_BEARER") })
local cc = wrk.format("POST", "/v1/oauth/token",
  { Host = host, Authorization = os.getenv("BENCH_BASIC"),
    ["Content-Type"] = "application/x-www-form-urlencoded" },
  os.getenv("BENCH_CC_BODY"))
local n = 0

function request()
  n = n + 1
  if n % 2 == 0 then return cc end
  return api
end
