#!/usr/bin/env bash
# Instructions per cache hit, counted by valgrind's callgrind: a figure that, unlike req/s, does
# not move with whatever else the machine is doing, so that two builds can be compared on a busy
# machine (throughput.sh gives the real rates).
#
# Starts on free loopback ports a private redis-server, mock-idp and token-proxy under
# `valgrind --tool=callgrind`, warms BENCH_KEYS keys, then collects only
# while BENCH_REQUESTS hit requests are sent over one keep-alive connection, and prints the
# instructions the proxy executed per request. Every request must be a 200 HIT.
#
# Environment (defaults in brackets):
#   BENCH_MODE [redis]        redis: TOKEN_PROXY_L1_CAPACITY=0, every hit reads Redis; rediss:
#                             the same over TLS (a throw-away CA); l1: hits answered from the
#                             in-process cache; baseline: proxy/examples/baseline.rs, the bare
#                             axum server of bench/throughput.sh (the floor: HTTP alone)
#   BENCH_REQUESTS [2000]     measured requests
#   BENCH_KEYS [100]          distinct warm keys the requests cycle through
#   BENCH_SKIP_BUILD [0]      1 = use the release binaries already built (CARGO_TARGET_DIR)
#   BENCH_PROFILE [unset]     a path: the measured profile is copied there, for
#                             `callgrind_annotate --inclusive=yes PATH`
# Everything listens on 127.0.0.1 only and is stopped on exit; the run is bounded (5 minutes).
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MODE=${BENCH_MODE:-redis}
REQUESTS=${BENCH_REQUESTS:-2000}
KEYS=${BENCH_KEYS:-100}
MAX_SECONDS=300

source "$ROOT/bench/lib.sh"

[[ $MODE =~ ^(redis|rediss|l1|baseline)$ ]] || die "BENCH_MODE must be redis, rediss, l1 or baseline, got '$MODE'"
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "BENCH_REQUESTS must be a positive integer"
[[ $KEYS =~ ^[1-9][0-9]*$ ]] || die "BENCH_KEYS must be a positive integer"
command -v valgrind >/dev/null || die "valgrind is needed (apt-get install valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control is needed (it comes with valgrind)"

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    cargo build --release -p token-proxy -p mock-idp --bins --example baseline
fi

bench_begin token-proxy-instructions
read -r P_REDIS P_REDIS_TLS P_IDP P_PROXY P_ADMIN <<<"$(free_ports 5)"
[[ $MODE == rediss ]] || P_REDIS_TLS=
start_redis_and_idp

L1_CAPACITY=100000
REDIS_URL=redis://127.0.0.1:$P_REDIS
case $MODE in
    redis) L1_CAPACITY=0 ;;
    rediss) L1_CAPACITY=0 REDIS_URL=rediss://127.0.0.1:$P_REDIS_TLS ;;
esac
CALLGRIND=(valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out")
if [[ $MODE == baseline ]]; then
    log "starting baseline under callgrind on 127.0.0.1:$P_PROXY"
    start proxy "${CALLGRIND[@]}" "$TARGET_DIR/release/examples/baseline" "127.0.0.1:$P_PROXY"
    wait_until proxy curl -sf --max-time 2 -X POST "http://127.0.0.1:$P_PROXY/oauth2/token"
else
    log "starting token-proxy under callgrind ($MODE hits) on 127.0.0.1:$P_PROXY"
    # Under valgrind everything is tens of times slower: the default Redis deadline (250ms)
    # would turn hits into misses on a busy machine.
    TOKEN_PROXY_REDIS_TIMEOUT=10s TOKEN_PROXY_LISTEN=127.0.0.1:$P_PROXY TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$P_ADMIN \
        TOKEN_PROXY_UPSTREAM_URL=http://127.0.0.1:$P_IDP/oauth2/token \
        TOKEN_PROXY_REDIS_URL=$REDIS_URL TOKEN_PROXY_REDIS_CA_FILE=${P_REDIS_TLS:+$WORK/tls/ca.pem} \
        TOKEN_PROXY_SECRET=$(openssl rand -base64 32) TOKEN_PROXY_LOG=warn TOKEN_PROXY_L1_CAPACITY=$L1_CAPACITY \
        start proxy "${CALLGRIND[@]}" "$TARGET_DIR/release/token-proxy"
    wait_until proxy curl -sf --max-time 2 "http://127.0.0.1:$P_ADMIN/readyz"
fi

# send N FIRST_KEY: N requests over one keep-alive connection, cycling through the keys; fails
# unless every answer is 200 with X-Cache HIT (after the warm-up round).
send() {
    python3 - "$P_PROXY" "$1" "$KEYS" "$2" <<'PY'
import base64, http.client, sys
port, n, keys, expect = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
auth = "Basic " + base64.b64encode(b"demo-client:demo-secret").decode()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    body = f"grant_type=client_credentials&aws_client_metadata={i % keys + 1}"
    conn.request("POST", "/oauth2/token", body,
                 {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    cache = response.getheader("X-Cache")
    if response.status != 200 or (expect == "hit" and cache != "HIT"):
        sys.exit(f"request {i}: {response.status} {cache}")
PY
}

log "warming $KEYS keys"
send "$KEYS" any
# Under valgrind a replica's first Redis commands may miss their deadline (fred then says
# `Canceled`): warm until one whole pass is hits, three passes at most.
for attempt in 1 2 3; do
    if send "$KEYS" hit; then break; fi
    ((attempt < 3)) || die "the keys did not all become hits"
    log "not every answer was a hit yet; warming again"
done
callgrind_control -z "${SERVER_PID[proxy]}" >/dev/null
log "measuring $REQUESTS requests"
send "$REQUESTS" hit
callgrind_control -d "${SERVER_PID[proxy]}" >/dev/null
sleep 1
total=$(cat "$WORK"/callgrind.out* | awk '/^summary:/ { s += $2 } END { print s + 0 }')
((total > 0)) || die "callgrind recorded nothing"
if [[ -n ${BENCH_PROFILE:-} ]]; then
    cp "$(ls "$WORK"/callgrind.out.* | head -n 1)" "$BENCH_PROFILE"
    log "profile in $BENCH_PROFILE"
fi
echo "| mode | requests | instructions | per request |"
echo "| --- | ---: | ---: | ---: |"
echo "| $MODE | $REQUESTS | $total | $((total / REQUESTS)) |"
