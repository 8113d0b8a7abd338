-- wrk script for bench/throughput.sh: a client-credentials token request from demo-client
-- (client_secret_basic), so after warm-up every answer of token-proxy is a cache hit.
--
-- By default every request is the same. With BENCH_KEYS=N (N > 1) in the environment, requests
-- cycle through N distinct cache keys (aws_client_metadata=1..N), so that concurrent requests
-- rarely ask for the same key and are not coalesced in-process; the keys must be warm.
wrk.method = "POST"
wrk.path = "/oauth2/token"
wrk.body = "grant_type=client_credentials"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
-- base64("demo-client:demo-secret")
wrk.headers["Authorization"] = "Basic ZGVtby1jbGllbnQ6ZGVtby1zZWNyZXQ="

local keys = tonumber(os.getenv("BENCH_KEYS") or "1") or 1
if keys > 1 then
    local requests = {}
    -- Built in init, not when the script loads: only then is wrk.host known, and without it
    -- wrk.format sends no Host header (which hyper accepts and nginx rightly refuses).
    function init(args)
        for k = 1, keys do
            requests[k] = wrk.format(nil, nil, nil, "grant_type=client_credentials&aws_client_metadata=" .. k)
        end
    end
    local i = 0
    function request()
        i = i % keys + 1
        return requests[i]
    end
end
