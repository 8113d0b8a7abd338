#!/usr/bin/env bash
# Throughput of token-proxy cache hits, against a minimal axum server as the ceiling and nginx
# proxy_cache as the reference a self-hoster would use instead.
#
# Builds the release binaries, then starts on free loopback ports:
#   - a private redis-server (no persistence), plain and TLS (a throw-away CA, bench/lib.sh),
#   - mock-idp (the upstream; default client demo-client/demo-secret),
#   - baseline: proxy/examples/baseline.rs, a bare axum server answering a fixed token response
#     of the same shape, size and headers as a hit,
#   - nginx: proxy_cache in front of mock-idp (bench/nginx.conf.template: keyed on the
#     Authorization header and the body, proxy_cache_lock on),
#   - token-proxy "L1": Redis + the default in-process cache (a hit never leaves the process),
#   - token-proxy "Redis hit": same Redis, TOKEN_PROXY_L1_CAPACITY=0 (every hit reads Redis and
#     opens the sealed entry),
#   - token-proxy "Redis hit over TLS": the same, over rediss:// (TOKEN_PROXY_REDIS_CA_FILE).
# For each key mode of BENCH_KEYS, warms the keys on every target, then runs wrk
# (bench/post_token.lua) against every target, interleaved, for BENCH_ROUNDS rounds, and prints
# a Markdown table of the median req/s, p50, p99 and the ratios to the baseline and to nginx.
# Fails if any response is not 2xx or if the upstream is called during the measurement (then the
# figures would not be hits).
#
# Environment (defaults in brackets):
#   BENCH_DURATION [10s]   wrk duration of each measured run (wrk syntax: 10s, 1m)
#   BENCH_ROUNDS [3]       interleaved rounds
#   BENCH_WARMUP [2s]      one unrecorded wrk run per target before the rounds (0 = none)
#   BENCH_THREADS [1]      wrk threads
#   BENCH_CONNECTIONS [50] wrk connections
#   BENCH_KEYS [1 1000]    key modes, space-separated: for each, the number of distinct cache keys
#                          the requests cycle through (warmed first). With many keys, concurrent
#                          requests ask for different keys, so each request on a Redis-hit
#                          replica makes its own Redis read; with 1 key, identical concurrent
#                          requests share reads (in-process coalescing), and the figure is no
#                          longer that of a Redis read per request. The script counts Redis entry
#                          reads (GETRANGE) during the Redis-hit runs and prints them per request.
#   BENCH_TARGETS [baseline nginx l1 redis rediss]  the targets measured (baseline always)
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
KEY_MODES=${BENCH_KEYS:-1 1000}
TARGETS=(${BENCH_TARGETS:-baseline nginx l1 redis rediss})

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
read -r -a KEY_MODES <<<"$KEY_MODES"
((${#KEY_MODES[@]} > 0)) || die "BENCH_KEYS must name at least one key count"
for keys in "${KEY_MODES[@]}"; do
    if ! [[ $keys =~ ^[1-9][0-9]{0,5}$ ]] || ((keys > 100000)); then
        die "BENCH_KEYS must be integers from 1 to 100000, got '$keys'"
    fi
done
for target in "${TARGETS[@]}"; do
    [[ $target =~ ^(baseline|nginx|l1|redis|rediss)$ ]] ||
        die "BENCH_TARGETS: unknown target '$target' (baseline nginx l1 redis rediss)"
done
[[ " ${TARGETS[*]} " == *" baseline "* ]] || TARGETS=(baseline "${TARGETS[@]}")
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
DURATION_S=$(seconds "$DURATION")
WARMUP_S=$(seconds "$WARMUP")
# Upper bound of the whole run after the build: the wrk runs, plus generous set-up and slack.
MAX_SECONDS=$((${#KEY_MODES[@]} * (${#TARGETS[@]} * (ROUNDS * (DURATION_S + 5) + WARMUP_S + 5) + 120) + 180))

for tool in redis-server redis-cli curl openssl python3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
install_tool wrk wrk
has_target nginx && install_tool nginx nginx-light

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p token-proxy -p mock-idp --bins --example baseline
fi
for bin in token-proxy mock-idp examples/baseline; do
    [[ -x $TARGET_DIR/release/$bin ]] || die "missing $TARGET_DIR/release/$bin (build it or unset BENCH_SKIP_BUILD)"
done

bench_begin token-proxy-bench

read -r P_REDIS P_REDIS_TLS P_IDP P_BASE P_NGINX P_L1 P_L1_ADMIN P_RH P_RH_ADMIN P_RT P_RT_ADMIN <<<"$(free_ports 11)"
has_target rediss || P_REDIS_TLS=
UPSTREAM=http://127.0.0.1:$P_IDP/oauth2/token
SECRET=$(openssl rand -base64 32)

start_redis_and_idp

log "starting baseline on 127.0.0.1:$P_BASE"
start baseline "$TARGET_DIR/release/examples/baseline" "127.0.0.1:$P_BASE"
wait_until baseline curl -sf --max-time 1 -X POST "http://127.0.0.1:$P_BASE/oauth2/token"

if has_target nginx; then
    start_nginx "$P_NGINX" "$P_IDP"
    wait_until nginx curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$P_NGINX/"
fi

# start_replica NAME PORT ADMIN_PORT REDIS_URL L1_CAPACITY [CA_FILE]: one token-proxy; every replica
# has the same upstream and secret, so the same keys and the same Redis entries. An empty
# L1_CAPACITY is the default (an empty setting counts as unset).
start_replica() {
    log "starting token-proxy $1 on 127.0.0.1:$2"
    TOKEN_PROXY_LISTEN=127.0.0.1:$2 TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$3 TOKEN_PROXY_UPSTREAM_URL=$UPSTREAM \
        TOKEN_PROXY_REDIS_URL=$4 TOKEN_PROXY_L1_CAPACITY=$5 TOKEN_PROXY_REDIS_CA_FILE=${6:-} \
        TOKEN_PROXY_SECRET=$SECRET TOKEN_PROXY_LOG=warn start "$1" "$TARGET_DIR/release/token-proxy"
    wait_until "$1" curl -sf --max-time 1 "http://127.0.0.1:$3/readyz"
}
has_target l1 && start_replica proxy-l1 "$P_L1" "$P_L1_ADMIN" "redis://127.0.0.1:$P_REDIS" ""
has_target redis && start_replica proxy-redis "$P_RH" "$P_RH_ADMIN" "redis://127.0.0.1:$P_REDIS" 0
has_target rediss && start_replica proxy-rediss "$P_RT" "$P_RT_ADMIN" "rediss://127.0.0.1:$P_REDIS_TLS" 0 "$WORK/tls/ca.pem"

declare -A ADDR=([baseline]=127.0.0.1:$P_BASE [nginx]=127.0.0.1:$P_NGINX [l1]=127.0.0.1:$P_L1
    [redis]=127.0.0.1:$P_RH [rediss]=127.0.0.1:$P_RT)
declare -A ADMIN=([l1]=127.0.0.1:$P_L1_ADMIN [redis]=127.0.0.1:$P_RH_ADMIN [rediss]=127.0.0.1:$P_RT_ADMIN)
declare -A LABEL=([baseline]="baseline (bare axum)" [nginx]="nginx proxy_cache hit" [l1]="token-proxy, L1 hit"
    [redis]="token-proxy, Redis hit (redis://)" [rediss]="token-proxy, Redis hit (rediss://)")
# Goals as ratios to the baseline's req/s (issue 15); the L1 hit must also beat nginx.
declare -A GOAL=([l1]=0.95 [redis]=0.80 [rediss]=0.70)
NGINX_GOAL=1.05
P99_GOAL=1.2

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
for target in "${TARGETS[@]}"; do
    [[ $target == baseline ]] && continue
    warm "${LABEL[$target]}" "${ADDR[$target]}"
done
[[ $(token_request "127.0.0.1:$P_BASE") == "200 HIT" ]] || die "baseline does not answer 200 HIT"

# warm_keys ADDR KEYS: requests keys 1..KEYS (aws_client_metadata=k) on ADDR, 32 at a time, then
# once more; all must be 200, and the second pass all HIT.
warm_keys() {
    awk -v addr="$1" -v n="$2" 'BEGIN {
        for (k = 1; k <= n; k++) {
            if (k > 1) print "next"
            printf "url = \"http://%s/oauth2/token\"\nuser = \"demo-client:demo-secret\"\n", addr
            printf "data = \"grant_type=client_credentials&aws_client_metadata=%d\"\n", k
            print "output = \"/dev/null\"\nwrite-out = \"%{http_code} %header{x-cache}\\n\"\nmax-time = 10"
        }
    }' >"$WORK/warm.curl"
    local codes
    curl -s --parallel --parallel-max 32 -K "$WORK/warm.curl" >/dev/null 2>&1
    codes=$(curl -s --parallel --parallel-max 32 -K "$WORK/warm.curl" 2>/dev/null | sort | uniq -c | tr -s ' \n' ' ')
    [[ $codes == " $2 200 HIT " ]] || die "warming $2 keys on $1: second pass status counts$codes"
}

# Milliseconds in a wrk latency figure (e.g. 512.00us, 1.20ms, 1.01s).
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n
    }'
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

# run_wrk TARGET KEYS DURATION OUT: one wrk run; fails on any non-2xx answer.
run_wrk() {
    local target=$1 keys=$2 duration=$3 out=$4
    BENCH_KEYS=$keys timeout $(($(seconds "$duration") + 30)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency --timeout 5s \
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

# Entry reads Redis has run so far (plain and TLS alike): GETRANGE on the hit-read connection.
redis_gets() {
    redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' |
        awk -F'[=,]' '/^cmdstat_(get|getrange):/ { n += $2 } END { print n + 0 }'
}

log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the runs"
declare -A GETS=()
for keys in "${KEY_MODES[@]}"; do
    if ((keys > 1)); then
        for target in "${TARGETS[@]}"; do
            [[ $target == baseline ]] && continue
            log "warming $keys distinct keys on ${LABEL[$target]}"
            warm_keys "${ADDR[$target]}" "$keys"
        done
    fi
    issued_before=$(issued)
    if ((WARMUP_S > 0)); then
        for target in "${TARGETS[@]}"; do
            log "warm-up ($keys keys): ${LABEL[$target]} for $WARMUP"
            run_wrk "$target" "$keys" "$WARMUP" "$WORK/warmup-$keys-$target.txt"
        done
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        for target in "${TARGETS[@]}"; do
            out=$WORK/wrk-$keys-$target-$round.txt
            gets_before=$(redis_gets)
            run_wrk "$target" "$keys" "$DURATION" "$out"
            GETS[$keys-$target]=$((${GETS[$keys-$target]:-0} + $(redis_gets) - gets_before))
            rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
            p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
            p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
            [[ -n $rps ]] || {
                cat "$out" >&2
                die "no Requests/sec in wrk's output"
            }
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$keys" "$target" "$round" "$rps" "$p50" "$p99" >>"$RESULTS"
            log "$keys keys, round $round/$ROUNDS ${LABEL[$target]}: $rps req/s, p50 ${p50} ms, p99 ${p99} ms"
        done
    done
    issued_after=$(issued)
    ((issued_after == issued_before)) ||
        die "$keys keys: the upstream issued $((issued_after - issued_before)) tokens during the measurement: not all requests were hits"
done

# Hits as the replicas counted them (requests_total by outcome), as a cross-check of X-Cache.
outcomes() {
    curl -sf --max-time 5 "http://$1/metrics" |
        awk -F'[{}]' '/^token_proxy_requests_total\{/ { split($3, v, " "); printf "%s%s=%s", sep, $2, v[1]; sep = ", " }'
}

# median COLUMN KEYS TARGET: the median of a results column over the rounds.
median() {
    awk -F'\t' -v k="$2" -v t="$3" -v c="$1" '$1 == k && $2 == t { print $c }' "$RESULTS" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# verdict RATIO OP GOAL TEXT: "TEXT: met" or "TEXT: NOT met".
verdict() {
    awk -v r="$1" -v op="$2" -v g="$3" -v t="$4" 'BEGIN {
        ok = (op == ">=" ? r >= g : r <= g); printf "%s: %s", t, (ok ? "met" : "NOT met")
    }'
}

echo
echo "## token-proxy hit throughput"
echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, $ROUNDS interleaved round(s) per key mode, median over rounds;"
echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) after the runs; $(date -u '+%Y-%m-%d %H:%M UTC')."
echo
echo "| keys | target | median req/s | p50 | p99 | × baseline | × nginx | p99 × baseline | goals |"
echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
for keys in "${KEY_MODES[@]}"; do
    base_rps=$(median 4 "$keys" baseline)
    base_p99=$(median 6 "$keys" baseline)
    nginx_rps=0
    has_target nginx && nginx_rps=$(median 4 "$keys" nginx)
    for target in "${TARGETS[@]}"; do
        rps=$(median 4 "$keys" "$target")
        p50=$(median 5 "$keys" "$target")
        p99=$(median 6 "$keys" "$target")
        to_base=$(ratio "$rps" "$base_rps")
        to_nginx=$(ratio "$rps" "$nginx_rps")
        p99_ratio=$(ratio "$p99" "$base_p99")
        goals="-"
        if [[ -n ${GOAL[$target]:-} ]]; then
            goals="$(verdict "$to_base" ">=" "${GOAL[$target]}" "≥ ${GOAL[$target]} × baseline")"
            if [[ $target == l1 && $to_nginx != - ]]; then
                goals+="; $(verdict "$to_nginx" ">=" "$NGINX_GOAL" "≥ $NGINX_GOAL × nginx")"
            fi
            goals+="; $(verdict "$p99_ratio" "<=" "$P99_GOAL" "p99 ≤ $P99_GOAL × baseline")"
        fi
        printf '| %s | %s | %.0f | %.2f ms | %.2f ms | %s | %s | %s | %s |\n' "$keys" "${LABEL[$target]}" \
            "$rps" "$p50" "$p99" "$to_base" "$to_nginx" "$p99_ratio" "$goals"
    done
done
echo
echo "Per round (req/s):"
echo
printf '| keys | round |'
for target in "${TARGETS[@]}"; do printf ' %s |' "${LABEL[$target]}"; done
printf '\n| ---: | ---: |'
for _ in "${TARGETS[@]}"; do printf ' ---: |'; done
printf '\n'
for keys in "${KEY_MODES[@]}"; do
    for ((round = 1; round <= ROUNDS; round++)); do
        printf '| %s | %d |' "$keys" "$round"
        for target in "${TARGETS[@]}"; do
            printf ' %.0f |' "$(awk -F'\t' -v k="$keys" -v t="$target" -v r="$round" \
                '$1 == k && $2 == t && $3 == r { print $4 }' "$RESULTS")"
        done
        printf '\n'
    done
done
echo
echo "Upstream tokens issued during the measurements: 0; non-2xx answers: 0."
for target in l1 redis rediss; do
    has_target "$target" && echo "Outcomes counted by ${LABEL[$target]}: {$(outcomes "${ADMIN[$target]}")}."
done
coalesced=0
for keys in "${KEY_MODES[@]}"; do
    for target in redis rediss; do
        has_target "$target" || continue
        # wrk's count of the replica's requests, over the measured rounds.
        requests=$(cat "$WORK"/wrk-"$keys-$target"-*.txt | awk '/requests in/ { n += $1 } END { print n + 0 }')
        per_request=$(ratio "${GETS[$keys-$target]}" "$requests")
        echo "$keys keys, ${LABEL[$target]}: ${GETS[$keys-$target]} Redis entry reads for $requests requests ($per_request per request)."
        awk -v x="$per_request" 'BEGIN { exit !(x < 0.95) }' && coalesced=1
    done
done
if ((coalesced)); then
    echo
    echo "Note: fewer Redis reads than requests: identical concurrent requests shared reads (in-process"
    echo "coalescing), so that Redis-hit figure is not one Redis read per request (see the 1000-key rows)."
fi
