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

# make_tls_ca DIR: a throw-away CA (DIR/ca.pem) and a server certificate for 127.0.0.1 signed by
# it (DIR/server.pem, DIR/server.key), for a TLS redis-server; the CA's key never leaves DIR.
make_tls_ca() {
    local dir=$1
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf '%s\n' basicConstraints=CA:FALSE subjectAltName=IP:127.0.0.1 keyUsage=digitalSignature \
        extendedKeyUsage=serverAuth >"$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
        -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
    [[ -s $dir/server.pem ]] || die "cannot make the TLS test certificates with openssl"
}

# A private redis-server on P_REDIS and mock-idp (its default demo-client) on P_IDP. With
# P_REDIS_TLS set, the same redis-server also listens with TLS on that port (certificates from
# make_tls_ca in $WORK/tls; clients trust $WORK/tls/ca.pem and need no certificate).
start_redis_and_idp() {
    local tls=()
    if [[ -n ${P_REDIS_TLS:-} ]]; then
        make_tls_ca "$WORK/tls"
        tls=(--tls-port "$P_REDIS_TLS" --tls-cert-file "$WORK/tls/server.pem" --tls-key-file "$WORK/tls/server.key"
            --tls-ca-cert-file "$WORK/tls/ca.pem" --tls-auth-clients no)
    fi
    log "starting redis-server on 127.0.0.1:$P_REDIS${P_REDIS_TLS:+ (TLS on $P_REDIS_TLS)}"
    start redis redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no --dir "$WORK" \
        --protected-mode yes --loglevel warning "${tls[@]}"
    wait_until redis redis-cli -p "$P_REDIS" ping
    log "starting mock-idp on 127.0.0.1:$P_IDP"
    MOCK_IDP_LISTEN=127.0.0.1:$P_IDP MOCK_IDP_LOG=warn start mock-idp "$TARGET_DIR/release/mock-idp"
    wait_until mock-idp curl -sf --max-time 1 "http://127.0.0.1:$P_IDP/.well-known/jwks.json"
}

# Tokens mock-idp has issued so far (P_IDP: its port).
issued() {
    curl -sf --max-time 5 "http://127.0.0.1:$P_IDP/admin/stats" | grep -o '"issued_total":[0-9]*' | cut -d: -f2
}

# start_nginx PORT UPSTREAM_PORT: nginx proxy_cache (bench/nginx.conf.template) on PORT in front of
# UPSTREAM_PORT, with its own prefix, configuration and pid file under $WORK/nginx; stopped by
# pid like every server started here.
start_nginx() {
    local prefix=$WORK/nginx user=
    mkdir -p "$prefix"
    # As root, nginx's workers would switch to `nobody`, who cannot enter $WORK (mode 700).
    [[ $(id -u) -eq 0 ]] && user="user root;"
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@PORT@|$1|g" -e "s|@UPSTREAM_PORT@|$2|g" -e "s|@USER@|$user|" \
        "$ROOT/bench/nginx.conf.template" >"$prefix/nginx.conf"
    log "starting nginx proxy_cache on 127.0.0.1:$1"
    start nginx nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log"
}

# install_tool COMMAND PACKAGE: installs Debian's PACKAGE when COMMAND is missing.
install_tool() {
    command -v "$1" >/dev/null && return
    log "installing $2"
    local sudo=
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get install -y "$2" >/dev/null || { $sudo apt-get update >/dev/null && $sudo apt-get install -y "$2" >/dev/null; }
    command -v "$1" >/dev/null || die "$1 is required (apt-get install $2)"
    # The package starts nginx as a system service where it can: the bench runs its own.
    if [[ $1 == nginx && -s /run/nginx.pid ]]; then
        $sudo kill "$(cat /run/nginx.pid)" 2>/dev/null || true
    fi
}
