#!/usr/bin/env bash
# Shared by bench/throughput.sh and bench/memory.sh: logging, a bounded run that cleans up after
# itself, free loopback ports, and starting and waiting for the servers. Source it after setting
# MAX_SECONDS (the bound of the whole run) and before starting anything.

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

# bench_begin PREFIX: a work directory for the servers' logs, and the cleanup that stops every
# server started with `start` (by pid) and the watchdog that bounds the run to MAX_SECONDS.
bench_begin() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    (
        sleep "$MAX_SECONDS" &
        sleeper=$!
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        wait "$sleeper"
        echo "FAIL: timed out after ${MAX_SECONDS}s" >&2
        kill -TERM $$ 2>/dev/null
    ) &
    WATCHDOG=$!
}

declare -A PID=()
WATCHDOG=
WORK=

bench_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $WATCHDOG ]]; then kill "$WATCHDOG" 2>/dev/null || true; fi
    local name
    for name in "${!PID[@]}"; do
        kill "${PID[$name]}" 2>/dev/null || true
    done
    for name in "${!PID[@]}"; do
        wait "${PID[$name]}" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        echo "logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}

# Distinct free loopback ports, all held open at once while they are picked.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# start NAME COMMAND...: runs COMMAND in the background, bounded by MAX_SECONDS, output in
# $WORK/NAME.log. Environment goes through `VAR=value start ...` (never on a command line).
# PID[NAME] is the `timeout` wrapper; SERVER_PID[NAME] (after wait_until) the server itself.
declare -A SERVER_PID=()
start() {
    local name=$1
    shift
    timeout --signal=TERM "$MAX_SECONDS" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
}

# wait_until NAME COMMAND...: polls COMMAND until it succeeds (30 s), failing if NAME exits.
wait_until() {
    local name=$1
    shift
    local deadline=$((SECONDS + 30))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "${PID[$name]}" 2>/dev/null; then
            tail -n 20 "$WORK/$name.log" >&2
            die "$name exited during start-up"
        fi
        ((SECONDS < deadline)) || {
            tail -n 20 "$WORK/$name.log" >&2
            die "$name not ready after 30s"
        }
        sleep 0.1
    done
    SERVER_PID[$name]=$(ps -o pid= --ppid "${PID[$name]}" | tr -d ' ' | head -n 1)
    [[ -n ${SERVER_PID[$name]} ]] || die "cannot find the process of $name"
}

# A private redis-server on P_REDIS and mock-idp (its default demo-client) on P_IDP.
start_redis_and_idp() {
    log "starting redis-server on 127.0.0.1:$P_REDIS"
    start redis redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no --dir "$WORK" \
        --protected-mode yes --loglevel warning
    wait_until redis redis-cli -p "$P_REDIS" ping
    log "starting mock-idp on 127.0.0.1:$P_IDP"
    MOCK_IDP_LISTEN=127.0.0.1:$P_IDP MOCK_IDP_LOG=warn start mock-idp "$TARGET_DIR/release/mock-idp"
    wait_until mock-idp curl -sf --max-time 1 "http://127.0.0.1:$P_IDP/.well-known/jwks.json"
}

# Tokens mock-idp has issued so far (P_IDP: its port).
issued() {
    curl -sf --max-time 5 "http://127.0.0.1:$P_IDP/admin/stats" | grep -o '"issued_total":[0-9]*' | cut -d: -f2
}
