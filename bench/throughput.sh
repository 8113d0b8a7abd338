#!/usr/bin/env bash
# Throughput of token-proxy cache hits, against a minimal axum server as the ceiling.
#
# Builds the release binaries, then starts on free loopback ports:
#   - a private redis-server (no persistence),
#   - mock-idp (the upstream; default client demo-client/demo-secret),
#   - baseline: proxy/examples/baseline.rs, a bare axum server answering a fixed token response
#     of the same shape, size and headers as a hit,
#   - token-proxy "L1": Redis + the default in-process cache (a hit never leaves the process),
#   - token-proxy "Redis hit": same Redis, TOKEN_PROXY_L1_CAPACITY=0 (every hit reads Redis and
#     opens the sealed entry).
# Warms BENCH_KEYS keys on each replica, then runs wrk (bench/post_token.lua) against baseline, L1 and
# Redis hit, interleaved, for BENCH_ROUNDS rounds, and prints a Markdown table of the median
# req/s, p50, p99 and the ratio to the baseline. Fails if any response is not 2xx or if the
# upstream is called during the measurement (then the figures would not be hits).
#
# Environment (defaults in brackets):
#   BENCH_DURATION [10s]   wrk duration of each measured run (wrk syntax: 10s, 1m)
#   BENCH_ROUNDS [3]       interleaved rounds
#   BENCH_WARMUP [2s]      one unrecorded wrk run per target before the rounds (0 = none)
#   BENCH_THREADS [1]      wrk threads
#   BENCH_CONNECTIONS [50] wrk connections
#   BENCH_KEYS [1000]      distinct cache keys the requests cycle through (warmed first). With
#                          many keys, concurrent requests ask for different keys, so each request
#                          on the Redis-hit replica makes its own Redis read; with BENCH_KEYS=1,
#                          identical concurrent requests share reads (in-process coalescing), and
#                          the figure is no longer that of a Redis read per request. The script
#                          counts Redis entry reads (GETRANGE) during the Redis-hit runs and prints
#                          them per request.
#   BENCH_SKIP_BUILD [0]   1 = use the release binaries already built
# Everything listens on 127.0.0.1 only and is stopped on exit; the whole run is time-bounded.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LUA=$ROOT/bench/post_token.lua

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
WARMUP=${BENCH_WARMUP:-2s}
THREADS=${BENCH_THREADS:-1}
CONNECTIONS=${BENCH_CONNECTIONS:-50}
KEYS=${BENCH_KEYS:-1000}

source "$ROOT/bench/lib.sh"

# Seconds in a wrk-style duration: 10, 10s, 2m, 1h.
seconds() {
    case $1 in
        *h) echo $((${1%h} * 3600)) ;;
        *m) echo $((${1%m} * 60)) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer, got '$ROUNDS'"
[[ $DURATION =~ ^[1-9][0-9]*[smh]?$ ]] || die "BENCH_DURATION must look like 10s or 1m, got '$DURATION'"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "BENCH_WARMUP must look like 2s or 0, got '$WARMUP'"
if ! [[ $KEYS =~ ^[1-9][0-9]{0,5}$ ]] || ((KEYS > 100000)); then
    die "BENCH_KEYS must be an integer from 1 to 100000, got '$KEYS'"
fi
DURATION_S=$(seconds "$DURATION")
WARMUP_S=$(seconds "$WARMUP")
# Upper bound of the whole run after the build: the wrk runs, plus generous set-up and slack.
MAX_SECONDS=$((3 * (ROUNDS * (DURATION_S + 5) + WARMUP_S + 5) + 180))

for tool in redis-server redis-cli curl openssl python3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
if ! command -v wrk >/dev/null; then
    log "installing wrk"
    if [[ $(id -u) -eq 0 ]]; then
        apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    else
        sudo apt-get install -y wrk >/dev/null || { sudo apt-get update >/dev/null && sudo apt-get install -y wrk >/dev/null; }
    fi
fi

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p token-proxy -p mock-idp --bins --example baseline
fi
for bin in token-proxy mock-idp examples/baseline; do
    [[ -x $TARGET_DIR/release/$bin ]] || die "missing $TARGET_DIR/release/$bin (build it or unset BENCH_SKIP_BUILD)"
done

bench_begin token-proxy-bench

read -r P_REDIS P_IDP P_BASE P_L1 P_L1_ADMIN P_RH P_RH_ADMIN <<<"$(free_ports 7)"
UPSTREAM=http://127.0.0.1:$P_IDP/oauth2/token
SECRET=$(openssl rand -base64 32)

start_redis_and_idp

log "starting baseline on 127.0.0.1:$P_BASE"
start baseline "$TARGET_DIR/release/examples/baseline" "127.0.0.1:$P_BASE"
wait_until baseline curl -sf --max-time 1 -X POST "http://127.0.0.1:$P_BASE/oauth2/token"

log "starting token-proxy L1 on 127.0.0.1:$P_L1, Redis hit on 127.0.0.1:$P_RH"
TOKEN_PROXY_LISTEN=127.0.0.1:$P_L1 TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$P_L1_ADMIN \
    TOKEN_PROXY_UPSTREAM_URL=$UPSTREAM TOKEN_PROXY_REDIS_URL=redis://127.0.0.1:$P_REDIS \
    TOKEN_PROXY_SECRET=$SECRET TOKEN_PROXY_LOG=warn \
    start proxy-l1 "$TARGET_DIR/release/token-proxy"
TOKEN_PROXY_LISTEN=127.0.0.1:$P_RH TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$P_RH_ADMIN \
    TOKEN_PROXY_UPSTREAM_URL=$UPSTREAM TOKEN_PROXY_REDIS_URL=redis://127.0.0.1:$P_REDIS \
    TOKEN_PROXY_SECRET=$SECRET TOKEN_PROXY_LOG=warn TOKEN_PROXY_L1_CAPACITY=0 \
    start proxy-redis "$TARGET_DIR/release/token-proxy"
wait_until proxy-l1 curl -sf --max-time 1 "http://127.0.0.1:$P_L1_ADMIN/readyz"
wait_until proxy-redis curl -sf --max-time 1 "http://127.0.0.1:$P_RH_ADMIN/readyz"

# One token request as the wrk script sends it; prints the status and the X-Cache header.
token_request() {
    curl -s -o /dev/null -D - --max-time 10 -u demo-client:demo-secret -d grant_type=client_credentials \
        "http://$1/oauth2/token" | tr -d '\r' |
        awk 'NR == 1 { status = $2 } tolower($1) == "x-cache:" { cache = $2 } END { print status, cache }'
}

warm() {
    local name=$1 addr=$2 first second
    first=$(token_request "$addr")
    second=$(token_request "$addr")
    [[ $second == "200 HIT" ]] || die "$name: expected '200 HIT' on the second request, got '$second' (first: '$first')"
    log "$name warmed: first '$first', second '$second'"
}
warm "L1" "127.0.0.1:$P_L1"
warm "Redis hit" "127.0.0.1:$P_RH"
[[ $(token_request "127.0.0.1:$P_BASE") == "200 HIT" ]] || die "baseline does not answer 200 HIT"

# warm_keys ADDR: requests keys 1..KEYS (aws_client_metadata=k) on ADDR, 32 at a time; all must be 200.
warm_keys() {
    awk -v addr="$1" -v n="$KEYS" 'BEGIN {
        for (k = 1; k <= n; k++) {
            if (k > 1) print "next"
            printf "url = \"http://%s/oauth2/token\"\nuser = \"demo-client:demo-secret\"\n", addr
            printf "data = \"grant_type=client_credentials&aws_client_metadata=%d\"\n", k
            print "output = \"/dev/null\"\nwrite-out = \"%{http_code}\\n\"\nmax-time = 10"
        }
    }' >"$WORK/warm.curl"
    local codes
    codes=$(curl -s --parallel --parallel-max 32 -K "$WORK/warm.curl" 2>/dev/null | sort | uniq -c | tr -s ' \n' ' ')
    [[ $codes == " $KEYS 200 " ]] || die "warming $KEYS keys on $1: status counts$codes"
}
if ((KEYS > 1)); then
    log "warming $KEYS distinct keys on both replicas"
    warm_keys "127.0.0.1:$P_L1"
    warm_keys "127.0.0.1:$P_RH"
fi

# Milliseconds in a wrk latency figure (e.g. 512.00us, 1.20ms, 1.01s).
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n
    }'
}

declare -A ADDR=([baseline]=127.0.0.1:$P_BASE [l1]=127.0.0.1:$P_L1 [redis]=127.0.0.1:$P_RH)
declare -A LABEL=([baseline]="baseline (bare axum)" [l1]="token-proxy, L1 hit" [redis]="token-proxy, Redis hit")
TARGETS=(baseline l1 redis)
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# run_wrk TARGET DURATION OUT: one wrk run; fails on any non-2xx answer.
run_wrk() {
    local target=$1 duration=$2 out=$3
    BENCH_KEYS=$KEYS timeout $(($(seconds "$duration") + 30)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency --timeout 5s \
        -s "$LUA" "http://${ADDR[$target]}/oauth2/token" >"$out" 2>&1 || {
        cat "$out" >&2
        die "wrk failed against $target"
    }
    if grep -q 'Non-2xx or 3xx responses' "$out"; then
        cat "$out" >&2
        die "${LABEL[$target]}: $(grep 'Non-2xx or 3xx responses' "$out" | sed 's/^ *//') (every answer must be a 200)"
    fi
    if grep -q 'Socket errors' "$out"; then
        log "warning: ${LABEL[$target]}: $(grep 'Socket errors' "$out" | sed 's/^ *//')"
    fi
}

log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the runs"
if ((WARMUP_S > 0)); then
    for target in "${TARGETS[@]}"; do
        log "warm-up: ${LABEL[$target]} for $WARMUP"
        run_wrk "$target" "$WARMUP" "$WORK/warmup-$target.txt"
    done
fi

# Entry reads Redis has run so far: GETRANGE on the hit-read connection (GET before it).
redis_gets() {
    redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' |
        awk -F'[=,]' '/^cmdstat_(get|getrange):/ { n += $2 } END { print n + 0 }'
}

ISSUED_BEFORE=$(issued)
REDIS_HIT_GETS=0
for ((round = 1; round <= ROUNDS; round++)); do
    for target in "${TARGETS[@]}"; do
        out=$WORK/wrk-$target-$round.txt
        if [[ $target == redis ]]; then
            gets_before=$(redis_gets)
            run_wrk "$target" "$DURATION" "$out"
            REDIS_HIT_GETS=$((REDIS_HIT_GETS + $(redis_gets) - gets_before))
        else
            run_wrk "$target" "$DURATION" "$out"
        fi
        rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
        p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
        p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
        [[ -n $rps ]] || {
            cat "$out" >&2
            die "no Requests/sec in wrk's output"
        }
        printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$round" "$rps" "$p50" "$p99" >>"$RESULTS"
        log "round $round/$ROUNDS ${LABEL[$target]}: $rps req/s, p50 ${p50} ms, p99 ${p99} ms"
    done
done
ISSUED_AFTER=$(issued)
((ISSUED_AFTER == ISSUED_BEFORE)) ||
    die "the upstream issued $((ISSUED_AFTER - ISSUED_BEFORE)) tokens during the measurement: not all requests were hits"

# Hits as the replicas counted them (requests_total by outcome), as a cross-check of X-Cache.
outcomes() {
    curl -sf --max-time 5 "http://$1/metrics" |
        awk -F'[{}]' '/^token_proxy_requests_total\{/ { split($3, v, " "); printf "%s%s=%s", sep, $2, v[1]; sep = ", " }'
}

# median COLUMN TARGET: the median of a results column over the rounds.
median() {
    awk -F'\t' -v t="$2" -v c="$1" '$1 == t { print $c }' "$RESULTS" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

BASE_RPS=$(median 3 baseline)
echo
echo "## token-proxy hit throughput"
echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, $KEYS distinct key(s), $ROUNDS interleaved round(s), median over rounds;"
echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) after the runs; $(date -u '+%Y-%m-%d %H:%M UTC')."
echo
echo "| target | median req/s | p50 | p99 | ratio to baseline | goal |"
echo "| --- | ---: | ---: | ---: | ---: | --- |"
for target in "${TARGETS[@]}"; do
    rps=$(median 3 "$target")
    p50=$(median 4 "$target")
    p99=$(median 5 "$target")
    ratio=$(awk -v a="$rps" -v b="$BASE_RPS" 'BEGIN { printf "%.2f", a / b }')
    case $target in
        l1) goal=0.90 ;;
        redis) goal=0.55 ;;
        *) goal= ;;
    esac
    verdict="-"
    if [[ -n $goal ]]; then
        verdict=$(awk -v r="$ratio" -v g="$goal" 'BEGIN { print (r >= g ? ">= " g ": met" : ">= " g ": NOT met") }')
    fi
    printf '| %s | %.0f | %.2f ms | %.2f ms | %s | %s |\n' "${LABEL[$target]}" "$rps" "$p50" "$p99" "$ratio" "$verdict"
done
echo
echo "Per round (req/s):"
echo
printf '| round |'
for target in "${TARGETS[@]}"; do printf ' %s |' "${LABEL[$target]}"; done
printf '\n| ---: |'
for _ in "${TARGETS[@]}"; do printf ' ---: |'; done
printf '\n'
for ((round = 1; round <= ROUNDS; round++)); do
    printf '| %d |' "$round"
    for target in "${TARGETS[@]}"; do
        printf ' %.0f |' "$(awk -F'\t' -v t="$target" -v r="$round" '$1 == t && $2 == r { print $3 }' "$RESULTS")"
    done
    printf '\n'
done
echo
echo "Upstream tokens issued during the measurement: $((ISSUED_AFTER - ISSUED_BEFORE)); non-2xx answers: 0."
echo "Outcomes counted by the replicas: L1 {$(outcomes "127.0.0.1:$P_L1_ADMIN")}; Redis hit {$(outcomes "127.0.0.1:$P_RH_ADMIN")}."
# wrk's count of the Redis-hit replica's requests, over the measured rounds.
REDIS_HIT_REQUESTS=$(cat "$WORK"/wrk-redis-*.txt | awk '/requests in/ { n += $1 } END { print n + 0 }')
GETS_PER_REQUEST=$(awk -v g="$REDIS_HIT_GETS" -v r="$REDIS_HIT_REQUESTS" 'BEGIN { printf "%.2f", (r > 0 ? g / r : 0) }')
echo "Redis GETs during the Redis-hit runs: $REDIS_HIT_GETS for $REDIS_HIT_REQUESTS requests ($GETS_PER_REQUEST per request)."
if awk -v x="$GETS_PER_REQUEST" 'BEGIN { exit !(x < 0.95) }'; then
    echo
    echo "Note: fewer Redis reads than requests: identical concurrent requests shared reads (in-process"
    echo "coalescing), so the Redis-hit figure is not one Redis read per request. Use BENCH_KEYS=1000."
fi
