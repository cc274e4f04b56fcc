-- One fixed request, built once (wrk's static fast path):
--   BENCH_METHOD (GET), BENCH_PATH (/), BENCH_BODY (none), BENCH_HEADERS, BENCH_HOST
package.path = "./?.lua;" .. package.path
local common = require("common")

wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.path = os.getenv("BENCH_PATH") or "/"
local body = os.getenv("BENCH_BODY")
if body and #body > 0 then wrk.body = body end
common.headers(wrk.headers)

setup = common.setup
done = common.done
