#!/usr/bin/env bash
# Memory of token-proxy's caches.
#
# (a) Redis bytes per cached entry: a replica with a private redis-server caches a few tokens;
#     for each entry `tp:{...}` the script prints MEMORY USAGE, the sealed value's length and the
#     response body's size, and the overhead over the body (goal: at most about 128 bytes).
# (b) Resident memory of a replica without Redis (in-process cache only, TOKEN_PROXY_L1_CAPACITY
#     default 10000) after caching 0, 10k and 100k distinct keys (distinct aws_client_metadata
#     values; every token is issued by mock-idp). The L1 bound must keep RSS flat past 10k.
#
# Environment (defaults in brackets):
#   MEM_KEYS_SMALL [10000]   distinct keys of the first step
#   MEM_KEYS_LARGE [100000]  distinct keys in all after the second step
#   MEM_PARALLEL [32]        concurrent requests while filling the cache
#   MEM_ENTRIES [5]          entries sampled for (a)
#   BENCH_SKIP_BUILD [0]     1 = use the release binaries already built
# Everything listens on 127.0.0.1 only and is stopped on exit; the whole run is time-bounded.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

KEYS_SMALL=${MEM_KEYS_SMALL:-10000}
KEYS_LARGE=${MEM_KEYS_LARGE:-100000}
PARALLEL=${MEM_PARALLEL:-32}
ENTRIES=${MEM_ENTRIES:-5}
# Requests go in batches, each one curl process bounded in time.
BATCH=2000
BATCH_TIMEOUT=300

source "$ROOT/bench/lib.sh"

for var in KEYS_SMALL KEYS_LARGE PARALLEL ENTRIES; do
    [[ ${!var} =~ ^[1-9][0-9]{0,6}$ ]] || die "$var must be a positive integer, got '${!var}'"
done
((KEYS_LARGE >= KEYS_SMALL)) || die "MEM_KEYS_LARGE must be at least MEM_KEYS_SMALL"
((KEYS_LARGE <= 1000000)) || die "MEM_KEYS_LARGE is at most 1000000"
# Upper bound of the whole run after the build: 10 ms per key (mock-idp signs each token in about
# 1 ms; the margin is for a busy machine) plus set-up.
MAX_SECONDS=$((KEYS_LARGE / 100 + 300))

for tool in redis-server redis-cli curl openssl python3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p token-proxy -p mock-idp --bins
fi
for bin in token-proxy mock-idp; do
    [[ -x $TARGET_DIR/release/$bin ]] || die "missing $TARGET_DIR/release/$bin (build it or unset BENCH_SKIP_BUILD)"
done

bench_begin token-proxy-mem

read -r P_REDIS P_IDP P_RP P_RP_ADMIN P_L1 P_L1_ADMIN <<<"$(free_ports 6)"
UPSTREAM=http://127.0.0.1:$P_IDP/oauth2/token

start_redis_and_idp

log "starting token-proxy with Redis on 127.0.0.1:$P_RP, without Redis on 127.0.0.1:$P_L1"
TOKEN_PROXY_LISTEN=127.0.0.1:$P_RP TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$P_RP_ADMIN \
    TOKEN_PROXY_UPSTREAM_URL=$UPSTREAM TOKEN_PROXY_REDIS_URL=redis://127.0.0.1:$P_REDIS \
    TOKEN_PROXY_SECRET=$(openssl rand -base64 32) TOKEN_PROXY_LOG=warn \
    start proxy-redis "$TARGET_DIR/release/token-proxy"
TOKEN_PROXY_LISTEN=127.0.0.1:$P_L1 TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:$P_L1_ADMIN \
    TOKEN_PROXY_UPSTREAM_URL=$UPSTREAM TOKEN_PROXY_LOG=warn \
    start proxy-l1 "$TARGET_DIR/release/token-proxy"
wait_until proxy-redis curl -sf --max-time 1 "http://127.0.0.1:$P_RP_ADMIN/readyz"
wait_until proxy-l1 curl -sf --max-time 1 "http://127.0.0.1:$P_L1_ADMIN/readyz"

# ---------------------------------------------------------------------------------------------
# (a) Redis bytes per entry
# ---------------------------------------------------------------------------------------------
log "(a) caching $ENTRIES entries through the Redis-backed replica"
BODY_BYTES=()
for ((k = 1; k <= ENTRIES; k++)); do
    size=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 10 -u demo-client:demo-secret \
        -d grant_type=client_credentials -d "aws_client_metadata=entry-$k" "http://127.0.0.1:$P_RP/oauth2/token")
    [[ $size == "200 "* ]] || die "token request $k through the Redis-backed replica: status ${size%% *}"
    BODY_BYTES+=("${size#* }")
done

mapfile -t ENTRY_KEYS < <(redis-cli -p "$P_REDIS" --scan --pattern 'tp:*' | grep -E '^tp:\{[^}]*\}$' | sort)
((${#ENTRY_KEYS[@]} == ENTRIES)) ||
    die "expected $ENTRIES entries tp:{...} in Redis, found ${#ENTRY_KEYS[@]}: $(redis-cli -p "$P_REDIS" --scan | head -n 10 | tr '\n' ' ')"
OTHER_KEYS=$(redis-cli -p "$P_REDIS" --scan | grep -cvE '^tp:\{[^}]*\}$' || true)

# The body of a hit has the same size as the one measured (expires_in can only lose a digit).
BODY_MIN=$(printf '%s\n' "${BODY_BYTES[@]}" | sort -n | head -n 1)
BODY_MAX=$(printf '%s\n' "${BODY_BYTES[@]}" | sort -n | tail -n 1)

echo
echo "## Memory"
echo
echo "### (a) Redis bytes per cached entry"
echo
echo "redis-server $(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-), response bodies of $BODY_MIN-$BODY_MAX bytes; keys other than entries left in Redis: $OTHER_KEYS."
echo
echo "| entry | key length | body | sealed value (STRLEN) | MEMORY USAGE | sealing overhead | Redis overhead | total overhead | goal (<= body + 128) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
WORST=0
for key in "${ENTRY_KEYS[@]}"; do
    usage=$(redis-cli -p "$P_REDIS" memory usage "$key")
    strlen=$(redis-cli -p "$P_REDIS" strlen "$key")
    overhead=$((usage - BODY_MAX))
    if ((overhead > WORST)); then WORST=$overhead; fi
    verdict=met
    ((overhead <= 128)) || verdict="NOT met"
    printf '| %s... | %d | %d | %d | %d | %d | %d | %d | %s |\n' "${key:0:12}" "${#key}" "$BODY_MAX" "$strlen" "$usage" \
        $((strlen - BODY_MAX)) $((usage - strlen)) "$overhead" "$verdict"
done
echo
echo "Worst overhead: $WORST bytes over a $BODY_MAX-byte body. Sealing overhead: key id, nonce and tag (and any"
echo "framing of the stored plaintext). Redis overhead: MEMORY USAGE minus the value's length, i.e. the key name,"
echo "Redis' object and dictionary entry, and the allocator's rounding of the value to its size class."

# ---------------------------------------------------------------------------------------------
# (b) RSS of an L1-only replica
# ---------------------------------------------------------------------------------------------
rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# fill FROM TO: requests keys FROM..TO (aws_client_metadata=mem-k) on the L1-only replica,
# MEM_PARALLEL at a time, in bounded batches; every answer must be 200.
fill() {
    local from=$1 to=$2 lo hi codes
    for ((lo = from; lo <= to; lo += BATCH)); do
        hi=$((lo + BATCH - 1))
        if ((hi > to)); then hi=$to; fi
        awk -v addr="127.0.0.1:$P_L1" -v lo="$lo" -v hi="$hi" 'BEGIN {
            for (k = lo; k <= hi; k++) {
                if (k > lo) print "next"
                printf "url = \"http://%s/oauth2/token\"\nuser = \"demo-client:demo-secret\"\n", addr
                printf "data = \"grant_type=client_credentials&aws_client_metadata=mem-%d\"\n", k
                print "output = \"/dev/null\"\nwrite-out = \"%{http_code}\\n\"\nmax-time = 30"
            }
        }' >"$WORK/fill.curl"
        codes=$(timeout "$BATCH_TIMEOUT" curl -s --parallel --parallel-max "$PARALLEL" -K "$WORK/fill.curl" 2>/dev/null |
            sort | uniq -c | tr -s ' \n' ' ')
        [[ $codes == " $((hi - lo + 1)) 200 " ]] || die "keys $lo..$hi: status counts$codes"
    done
}

L1_PID=${SERVER_PID[proxy-l1]}
[[ $(ps -o comm= -p "$L1_PID") == token-proxy ]] || die "pid $L1_PID is not token-proxy"
declare -A RSS=()
RSS[0]=$(rss_kib "$L1_PID")
log "(b) L1-only replica (pid $L1_PID): RSS ${RSS[0]} KiB with 0 keys"

ISSUED_START=$(issued)
started=$SECONDS
log "(b) caching $KEYS_SMALL distinct keys"
fill 1 "$KEYS_SMALL"
RSS[$KEYS_SMALL]=$(rss_kib "$L1_PID")
log "(b) RSS ${RSS[$KEYS_SMALL]} KiB with $KEYS_SMALL keys ($((SECONDS - started)) s)"
if ((KEYS_LARGE > KEYS_SMALL)); then
    log "(b) caching keys $((KEYS_SMALL + 1))..$KEYS_LARGE"
    fill $((KEYS_SMALL + 1)) "$KEYS_LARGE"
    RSS[$KEYS_LARGE]=$(rss_kib "$L1_PID")
    log "(b) RSS ${RSS[$KEYS_LARGE]} KiB with $KEYS_LARGE keys ($((SECONDS - started)) s)"
fi
ISSUED_FILL=$(($(issued) - ISSUED_START))
((ISSUED_FILL == KEYS_LARGE)) || die "mock-idp issued $ISSUED_FILL tokens for $KEYS_LARGE distinct keys"

echo
echo "### (b) RSS of a replica without Redis (TOKEN_PROXY_L1_CAPACITY default)"
echo
echo "Distinct keys = distinct aws_client_metadata values, each token issued by mock-idp ($ISSUED_FILL issued)."
echo
echo "| distinct keys cached | VmRSS |"
echo "| ---: | ---: |"
STEPS=(0 "$KEYS_SMALL")
if ((KEYS_LARGE > KEYS_SMALL)); then STEPS+=("$KEYS_LARGE"); fi
for n in "${STEPS[@]}"; do
    awk -v n="$n" -v kib="${RSS[$n]}" 'BEGIN { printf "| %d | %.1f MiB (%d KiB) |\n", n, kib / 1024, kib }'
done
if ((KEYS_LARGE > KEYS_SMALL)); then
    echo
    awk -v a="${RSS[$KEYS_SMALL]}" -v b="${RSS[$KEYS_LARGE]}" -v s="$KEYS_SMALL" -v l="$KEYS_LARGE" 'BEGIN {
        printf "From %d to %d keys RSS changed by %+.1f MiB (%+.0f%%).\n", s, l, (b - a) / 1024, 100 * (b - a) / a
    }'
fi
