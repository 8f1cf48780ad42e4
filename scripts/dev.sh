#!/usr/bin/env bash
# scripts/dev.sh — run Herald on this machine and watch invalidations arrive.
# Used by `make dev`.
#
# What it does:
#   0. An exported DATABASE_URL or REDIS_URL is used only with
#      HERALD_DEV_USE_EXISTING=1 (this script creates a table, installs
#      triggers and writes demo rows there); otherwise it stops and says so.
#   1. PostgreSQL: if DATABASE_URL is unset, starts a throwaway server from the
#      machine's binaries (initdb/pg_ctl on PATH or /usr/lib/postgresql/*/bin),
#      data in .dev/pg (reused if present), 127.0.0.1:55432, trust auth,
#      wal_level=logical, and exports
#      DATABASE_URL=postgres://postgres@127.0.0.1:55432/postgres.
#      Running as root, the server runs as the `postgres` user (initdb refuses
#      root).
#   2. Redis: if REDIS_URL is unset, starts a throwaway redis-server on
#      127.0.0.1:56379 without persistence and exports REDIS_URL.
#   3. Applies deploy/demo.sql (table public.res_users + seed rows alice, bob,
#      carol; idempotent), puts back the seed slugs of alice, bob and carol if
#      an earlier run renamed them, and adds the rows the demo loop changes
#      (dave, erin, frank; ids 101-103). alice, bob and carol are the user's:
#      the demo never touches them (the README's examples use them).
#   4. cargo build --release -p herald-capture -p herald-broadcast -p herald-cache-api -p herald-gateway
#      (binaries in ${CARGO_TARGET_DIR:-target}/release; the first build takes
#      several minutes).
#   5. herald-capture install, then herald-capture run, herald-broadcast run
#      and herald-cache-api run in the background (logs: .dev/capture.log,
#      .dev/broadcast.log, .dev/cache-api.log; the cache API on
#      127.0.0.1:8080 (HTTP) and :50051 (gRPC) with the token in
#      HERALD_CACHE_TOKEN, default dev-token-0123456789), and
#      herald-gateway run (WebSocket ws://127.0.0.1:8081/v1/ws, publish API
#      with the token in HERALD_GATEWAY_SERVICE_TOKEN, client JWTs signed
#      with HERALD_GATEWAY_JWT_SECRET; dev defaults below; log
#      .dev/gateway.log), and
#      herald-broadcast watch whose output is printed here prefixed with [l1].
#      Prints the environment (DATABASE_URL, REDIS_URL, HERALD_CONFIG,
#      HERALD_ENV, tokens, PATH with the binaries) and writes it to .dev/env,
#      so another shell can `source .dev/env` and run the commands against
#      these servers; .dev/env is removed when this script stops.
#      The team feed and live console pages (clients/typescript/pages,
#      built with npm) on http://127.0.0.1:8090 (PAGES_ADDR) when node and
#      npm are installed; log .dev/pages.log.
#   6. Every 2 s changes a random demo row (its name, or its slug) and says
#      what it did, so you see the invalidation arrive on the [l1] lines, then
#      reads the row through the cache API ([cache] lines: which layer
#      answered, and the value — never the old one).
#   Ctrl-C stops the processes it started and the throwaway servers it started
#   (never servers it found already running, nor ones given by URL).
#
# Environment:
#   DATABASE_URL, REDIS_URL  use these servers instead of throwaway ones; only
#                            together with HERALD_DEV_USE_EXISTING=1
#   HERALD_DEV_USE_EXISTING=1  allow writing the demo table, triggers and rows
#                            into the servers of DATABASE_URL / REDIS_URL
#   CARGO_TARGET_DIR         cargo's target directory (default: target)
#   PG_BIN                   directory holding initdb/pg_ctl (default: search)
#   DEV_ONLY_SERVERS=1       only start the throwaway servers, apply
#                            deploy/demo.sql, print the URLs and the demo rows,
#                            then stop the servers and exit (no cargo, no
#                            Herald processes). Handy to test this script.
#   DEV_SKIP_BUILD=1         do not run cargo; use the binaries already built
#   DEV_INTERVAL=2           seconds between demo writes
#   RUST_LOG                 log level of the services (default: info)
#   HERALD_CAPTURE__OPS_ADDR, HERALD_BROADCAST__OPS_ADDR, HERALD_CACHE__OPS_ADDR
#                            ops servers (default 127.0.0.1:9101 / :9102 / :9103)
#   HERALD_CACHE__HTTP_ADDR, HERALD_CACHE__GRPC_ADDR
#                            cache API (default 127.0.0.1:8080 / :50051)
#   HERALD_CACHE_TOKEN       the cache API's token (default dev-token-0123456789)
#   HERALD_GATEWAY_JWT_SECRET, HERALD_GATEWAY_SERVICE_TOKEN
#                            the gateway's client-token key and publish token
#                            (dev defaults; never use them elsewhere)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DEV="$ROOT/.dev"
PGDATA_DIR="$DEV/pg"
PG_PORT=55432
REDIS_PORT=56379
CONFIG="$ROOT/deploy/herald.toml"
INTERVAL=${DEV_INTERVAL:-2}

log() { printf '[dev] %s\n' "$*"; }
die() { printf '[dev] error: %s\n' "$*" >&2; exit 1; }
# URL with the password hidden, for printing.
redact() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

mkdir -p "$DEV"

# ---------------------------------------------------------------------------
# cleanup: only what this script started
# ---------------------------------------------------------------------------
PIDS=()           # background Herald processes
PID_NAMES=()
PG_STARTED=0
REDIS_STARTED=0
CLEANED=0
ENV_WRITTEN=0     # .dev/env written by this run (removed at exit)
PG_RUN=()         # prefix running a command as the postgres user when root

as_pg() { ${PG_RUN[@]+"${PG_RUN[@]}"} "$@"; }

cleanup() {
    local rc=$?
    if ((CLEANED)); then return; fi
    CLEANED=1
    trap '' INT TERM
    local i pid deadline
    if ((ENV_WRITTEN)); then rm -f "$DEV/env"; fi
    if ((${#PIDS[@]})); then
        log "stopping ${PID_NAMES[*]}"
        for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        deadline=$((SECONDS + 10))
        for pid in "${PIDS[@]}"; do
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
            kill -KILL "$pid" 2>/dev/null || true
        done
        wait 2>/dev/null || true
    fi
    if ((PG_STARTED)); then
        log "stopping throwaway PostgreSQL (.dev/pg, port $PG_PORT)"
        as_pg "$PG_CTL" -D "$PGDATA_DIR" -m fast -w stop >/dev/null 2>&1 ||
            log "warning: pg_ctl stop failed; see .dev/postgres.log"
    fi
    if ((REDIS_STARTED)); then
        log "stopping throwaway Redis (port $REDIS_PORT)"
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        for i in $(seq 50); do port_busy "$REDIS_PORT" || break; sleep 0.1; done
        port_busy "$REDIS_PORT" && log "warning: Redis still listens on $REDIS_PORT"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
find_pg_bin() {
    local d v
    if [[ -n ${PG_BIN:-} ]]; then
        echo "$PG_BIN"
        return
    fi
    # An existing data dir wants the binaries of its own major version.
    if [[ -f $PGDATA_DIR/PG_VERSION ]]; then
        v=$(<"$PGDATA_DIR/PG_VERSION")
        if [[ -x /usr/lib/postgresql/$v/bin/pg_ctl ]]; then
            echo "/usr/lib/postgresql/$v/bin"
            return
        fi
    fi
    if command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
        if [[ -x $d/pg_ctl && -x $d/initdb ]]; then
            echo "$d"
            return
        fi
    done
    return 1
}

PSQL=$(command -v psql 2>/dev/null || true)

# ---------------------------------------------------------------------------
# an exported DATABASE_URL / REDIS_URL needs an explicit opt-in
# ---------------------------------------------------------------------------
if [[ -n ${DATABASE_URL:-}${REDIS_URL:-} && ${HERALD_DEV_USE_EXISTING:-0} != 1 ]]; then
    [[ -n ${DATABASE_URL:-} ]] && log "DATABASE_URL is set: $(redact "$DATABASE_URL")"
    [[ -n ${REDIS_URL:-} ]] && log "REDIS_URL is set: $(redact "$REDIS_URL")"
    die "make dev would create public.res_users, install Herald's triggers and write demo rows (and Redis keys under herald:dev:) there.
[dev] To use throwaway servers instead:  env -u DATABASE_URL -u REDIS_URL make dev
[dev] To use these servers anyway:       HERALD_DEV_USE_EXISTING=1 make dev"
fi

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------
if [[ -z ${DATABASE_URL:-} ]]; then
    PG_DIR=$(find_pg_bin) ||
        die "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL or set DATABASE_URL"
    INITDB="$PG_DIR/initdb"
    PG_CTL="$PG_DIR/pg_ctl"
    [[ -x $INITDB && -x $PG_CTL ]] || die "initdb/pg_ctl not found in $PG_DIR"
    [[ -n $PSQL ]] || PSQL="$PG_DIR/psql"

    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 ||
            die "running as root: initdb refuses root and there is no 'postgres' user; run as a normal user or set DATABASE_URL"
        command -v runuser >/dev/null 2>&1 || die "running as root needs runuser to start PostgreSQL as 'postgres'"
        PG_RUN=(runuser -u postgres --)
    fi

    SOCK_DIR="$DEV/sock"
    mkdir -p "$PGDATA_DIR" "$SOCK_DIR"
    touch "$DEV/postgres.log"
    if ((EUID == 0)); then
        chown -R postgres: "$PGDATA_DIR" "$SOCK_DIR" "$DEV/postgres.log"
        as_pg test -w "$PGDATA_DIR" ||
            die "user 'postgres' cannot write $PGDATA_DIR (is the repository in a private directory?); run as a normal user or set DATABASE_URL"
    fi
    chmod 700 "$PGDATA_DIR"

    if [[ ! -f $PGDATA_DIR/PG_VERSION ]]; then
        log "initdb .dev/pg ($PG_DIR)"
        as_pg "$INITDB" -D "$PGDATA_DIR" -U postgres -A trust -E UTF8 --locale=C >"$DEV/initdb.log" 2>&1 ||
            die "initdb failed; see .dev/initdb.log"
    fi

    if as_pg "$PG_CTL" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
        log "PostgreSQL in .dev/pg is already running (left from an earlier run): reusing it, it will not be stopped"
    else
        port_busy "$PG_PORT" && die "port $PG_PORT is in use by another process"
        PG_STARTED=1
        as_pg "$PG_CTL" -D "$PGDATA_DIR" -l "$DEV/postgres.log" -w -t 60 \
            -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$SOCK_DIR' -c wal_level=logical" \
            start >/dev/null || {
            tail -n 20 "$DEV/postgres.log" >&2 || true
            die "PostgreSQL did not start (a data dir from another major version? then rm -rf .dev/pg)"
        }
    fi
    export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    if ((PG_STARTED)); then
        PG_DESC="throwaway, data .dev/pg, binaries $PG_DIR"
    else
        PG_DESC="throwaway from an earlier run, data .dev/pg; left running"
    fi
else
    PG_DESC="from DATABASE_URL, HERALD_DEV_USE_EXISTING=1"
fi
[[ -n $PSQL && -x $PSQL ]] || die "psql not found; install the PostgreSQL client"

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------
if [[ -z ${REDIS_URL:-} ]]; then
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found; install Redis or set REDIS_URL"
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found; install Redis or set REDIS_URL"
    if [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; then
        log "a Redis already answers on port $REDIS_PORT (left from an earlier run?): reusing it, it will not be stopped"
    else
        port_busy "$REDIS_PORT" && die "port $REDIS_PORT is in use by another process"
        REDIS_STARTED=1
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
            --daemonize yes --pidfile "$DEV/redis.pid" --logfile "$DEV/redis.log" --dir "$DEV" ||
            die "redis-server did not start; see .dev/redis.log"
        for _ in $(seq 100); do
            [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
            sleep 0.1
        done
        [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] ||
            die "Redis did not answer on port $REDIS_PORT; see .dev/redis.log"
    fi
    export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    if ((REDIS_STARTED)); then
        REDIS_DESC="throwaway, no persistence"
    else
        REDIS_DESC="already running; left running"
    fi
else
    REDIS_DESC="from REDIS_URL, HERALD_DEV_USE_EXISTING=1"
fi

log "PostgreSQL: $(redact "$DATABASE_URL")  ($PG_DESC)"
log "Redis:      $(redact "$REDIS_URL")  ($REDIS_DESC)"

# ---------------------------------------------------------------------------
# demo table
# ---------------------------------------------------------------------------
export PGCONNECT_TIMEOUT=10
psql_q() { PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }

for _ in $(seq 30); do
    psql_q -c 'SELECT 1' >/dev/null 2>&1 && break
    sleep 1
done
psql_q -f "$ROOT/deploy/demo.sql" >/dev/null || die "applying deploy/demo.sql failed"
# The demo loop changes only rows with ids above 100; alice, bob and carol
# (the README's examples) keep their seed slugs, which an earlier version of
# this script renamed.
DEMO_ROWS_SQL="
UPDATE public.res_users u SET website_slug = s.slug, updated_at = now()
FROM (VALUES (1, 'alice'), (2, 'bob'), (3, 'carol')) AS s(id, slug)
WHERE u.id = s.id AND u.website_slug IS DISTINCT FROM s.slug
  AND NOT EXISTS (SELECT 1 FROM public.res_users o WHERE o.website_slug = s.slug AND o.id <> s.id);
INSERT INTO public.res_users (id, tenant_id, team_id, website_slug, callsign, name)
VALUES (101, 'demo', 1, 'dave', 'DELTA', 'Dave Demo'),
       (102, 'demo', 2, 'erin', 'ECHO', 'Erin Demo'),
       (103, 'demo', 2, 'frank', 'FOXTROT', 'Frank Demo')
ON CONFLICT DO NOTHING;
SELECT setval(pg_get_serial_sequence('public.res_users', 'id'), GREATEST((SELECT max(id) FROM public.res_users), 1));"
psql_q -c "$DEMO_ROWS_SQL" >/dev/null || die "adding the demo loop's rows failed"
log "applied deploy/demo.sql (public.res_users; the demo changes dave, erin and frank only)"

if [[ ${DEV_ONLY_SERVERS:-0} == 1 ]]; then
    echo "DATABASE_URL=$DATABASE_URL"
    echo "REDIS_URL=$REDIS_URL"
    "$PSQL" -X -v ON_ERROR_STOP=1 -d "$DATABASE_URL" \
        -c 'SELECT id, tenant_id, team_id, website_slug, callsign, name FROM public.res_users ORDER BY id'
    log "DEV_ONLY_SERVERS=1: done"
    exit 0
fi

# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/release"
if [[ ${DEV_SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release -p herald-capture -p herald-broadcast -p herald-cache-api -p herald-gateway"
    log "(the first build takes several minutes; later ones only rebuild what changed)"
    cargo build --release -p herald-capture -p herald-broadcast -p herald-cache-api -p herald-gateway
fi
for b in herald-capture herald-broadcast herald-cache-api herald-gateway; do
    [[ -x $BIN/$b ]] || die "$BIN/$b not found (build failed, or CARGO_TARGET_DIR differs)"
done

# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------
export HERALD_ENV=${HERALD_ENV:-dev}
export RUST_LOG=${RUST_LOG:-info}
export HERALD_CAPTURE__OPS_ADDR=${HERALD_CAPTURE__OPS_ADDR:-127.0.0.1:9101}
export HERALD_BROADCAST__OPS_ADDR=${HERALD_BROADCAST__OPS_ADDR:-127.0.0.1:9102}
export HERALD_CACHE__OPS_ADDR=${HERALD_CACHE__OPS_ADDR:-127.0.0.1:9103}
export HERALD_CACHE__HTTP_ADDR=${HERALD_CACHE__HTTP_ADDR:-127.0.0.1:8080}
export HERALD_CACHE__GRPC_ADDR=${HERALD_CACHE__GRPC_ADDR:-127.0.0.1:50051}
export HERALD_CACHE_TOKEN=${HERALD_CACHE_TOKEN:-dev-token-0123456789}
export HERALD_GATEWAY__LISTEN_ADDR=${HERALD_GATEWAY__LISTEN_ADDR:-127.0.0.1:8081}
export HERALD_GATEWAY__GRPC_ADDR=${HERALD_GATEWAY__GRPC_ADDR:-127.0.0.1:50052}
export HERALD_GATEWAY__OPS_ADDR=${HERALD_GATEWAY__OPS_ADDR:-127.0.0.1:9104}
export HERALD_GATEWAY_JWT_SECRET=${HERALD_GATEWAY_JWT_SECRET:-dev-jwt-secret-0123456789-0123456789}
export HERALD_GATEWAY_SERVICE_TOKEN=${HERALD_GATEWAY_SERVICE_TOKEN:-dev-service-token-0123456789}
CFG=(--config "$CONFIG")

export HERALD_CONFIG="$CONFIG"
CLIENT_TOKEN=$("$BIN/herald-gateway" "${CFG[@]}" token --tenant demo --sub dev --channels 'team:*' --ttl 86400) ||
    die "herald-gateway token failed"
export HERALD_CLIENT_TOKEN="$CLIENT_TOKEN"

# The environment of this run, for another shell: `source .dev/env`.
ENV_FILE="$DEV/env"
ENV_VARS=(DATABASE_URL REDIS_URL HERALD_CONFIG HERALD_ENV HERALD_CACHE_TOKEN HERALD_GATEWAY_JWT_SECRET
    HERALD_GATEWAY_SERVICE_TOKEN HERALD_CLIENT_TOKEN
    HERALD_CAPTURE__OPS_ADDR HERALD_BROADCAST__OPS_ADDR HERALD_CACHE__OPS_ADDR HERALD_CACHE__HTTP_ADDR
    HERALD_CACHE__GRPC_ADDR HERALD_GATEWAY__LISTEN_ADDR HERALD_GATEWAY__GRPC_ADDR HERALD_GATEWAY__OPS_ADDR)
write_env() {
    local v
    printf '# The environment of the running `make dev` (pid %s, %s); removed when it stops.\n' "$$" "$(date -Is)"
    printf '# In another shell: source .dev/env\n'
    for v in "${ENV_VARS[@]}"; do printf 'export %s=%q\n' "$v" "${!v}"; done
    printf 'export HERALD_BIN=%q\n' "$BIN"
    printf 'case ":$PATH:" in *":$HERALD_BIN:"*) ;; *) export PATH="$HERALD_BIN:$PATH" ;; esac\n'
}
(umask 077 && write_env >"$ENV_FILE.tmp") && mv "$ENV_FILE.tmp" "$ENV_FILE"
ENV_WRITTEN=1

log "environment (also in .dev/env; in another shell: source .dev/env):"
for v in "${ENV_VARS[@]}"; do
    case $v in
    DATABASE_URL | REDIS_URL) log "  $v=$(redact "${!v}")" ;;
    *) log "  $v=${!v}" ;;
    esac
done
log "  PATH=$BIN:\$PATH"
log "binaries:   $BIN/herald-capture, herald-broadcast, herald-cache-api, herald-gateway"
log "config:     deploy/herald.toml (env=$HERALD_ENV)"
log "ops:        capture http://$HERALD_CAPTURE__OPS_ADDR/metrics, broadcast http://$HERALD_BROADCAST__OPS_ADDR/metrics, cache-api http://$HERALD_CACHE__OPS_ADDR/metrics, gateway http://$HERALD_GATEWAY__OPS_ADDR/metrics"
log "cache API:  curl -fsS -H 'Authorization: Bearer $HERALD_CACHE_TOKEN' 'http://$HERALD_CACHE__HTTP_ADDR/v1/t/demo/r/user_by_slug?slug=alice'"
log "publish:    curl -fsS -H 'Authorization: Bearer $HERALD_GATEWAY_SERVICE_TOKEN' -d '{\"tenant\":\"demo\",\"channel\":\"team:1\",\"data\":{\"text\":\"hello\"}}' http://$HERALD_GATEWAY__LISTEN_ADDR/v1/publish"
log "WebSocket:  ws://$HERALD_GATEWAY__LISTEN_ADDR/v1/ws with the client token \$HERALD_CLIENT_TOKEN (docs/gateway-protocol.md);"
log "            another: herald-gateway token --tenant demo --sub alice --channels 'team:*' --ttl 3600"
log "commands:   source .dev/env; herald-capture status; herald-broadcast watch"
log "logs:       .dev/capture.log .dev/broadcast.log .dev/cache-api.log .dev/gateway.log .dev/watch.log"

# deploy/herald.toml reads the WAL (the throwaway server has wal_level =
# logical); a server given by URL may not: let capture choose there.
if [[ ${HERALD_DEV_USE_EXISTING:-0} == 1 ]]; then export HERALD_CAPTURE__SOURCE=${HERALD_CAPTURE__SOURCE:-auto}; fi
log "herald-capture install (capture.source ${HERALD_CAPTURE__SOURCE:-wal})"
"$BIN/herald-capture" "${CFG[@]}" install || die "herald-capture install failed"

start_bg() { # name logfile cmd...
    local name=$1 logfile=$2
    shift 2
    printf '\n=== %s started %s ===\n' "$name" "$(date -Is)" >>"$logfile"
    "$@" >>"$logfile" 2>&1 &
    PIDS+=($!)
    PID_NAMES+=("$name")
}
start_bg capture "$DEV/capture.log" "$BIN/herald-capture" "${CFG[@]}" run
start_bg broadcast "$DEV/broadcast.log" "$BIN/herald-broadcast" "${CFG[@]}" run
start_bg cache-api "$DEV/cache-api.log" "$BIN/herald-cache-api" "${CFG[@]}" run
start_bg gateway "$DEV/gateway.log" "$BIN/herald-gateway" "${CFG[@]}" run

# The team feed and live console pages (clients/typescript/pages), when Node is here.
PAGES_ADDR=${PAGES_ADDR:-127.0.0.1:8090}
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    log "building the TypeScript client for the pages (npm ci, npm run build; log .dev/npm.log)"
    if (cd "$ROOT/clients/typescript" && npm ci --no-audit --no-fund && npm run build) >"$DEV/npm.log" 2>&1; then
        start_bg pages "$DEV/pages.log" env PAGES_ADDR="$PAGES_ADDR" \
            HERALD_GATEWAY_WS="ws://$HERALD_GATEWAY__LISTEN_ADDR/v1/ws" HERALD_CACHE_URL="http://$HERALD_CACHE__HTTP_ADDR" \
            node "$ROOT/clients/typescript/pages/serve.mjs"
        log "pages:      team feed http://$PAGES_ADDR/team-feed.html, live console http://$PAGES_ADDR/console.html"
    else
        log "warning: building clients/typescript failed (see .dev/npm.log); the pages are not served"
    fi
else
    log "node/npm not found: the team feed and live console pages are not served"
fi

# watch: each invalidation is one JSON line; print it here with an [l1] prefix.
printf '\n=== watch started %s ===\n' "$(date -Is)" >>"$DEV/watch.log"
"$BIN/herald-broadcast" "${CFG[@]}" watch 2>>"$DEV/watch.log" \
    > >(while IFS= read -r line; do printf '[l1] %s\n' "$line"; done) &
PIDS+=($!)
PID_NAMES+=(watch)

check_alive() {
    local i
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            local name=${PID_NAMES[$i]}
            log "$name exited; last lines of .dev/$name.log:"
            tail -n 20 "$DEV/$name.log" >&2 || true
            exit 1
        fi
    done
}

http_ok() ( # host:port path — in a subshell, so a failed redirection cannot exit the script
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "http://$1$2" 2>/dev/null
    else
        host=${1%:*} port=${1##*:}
        [[ $host == 0.0.0.0 ]] && host=127.0.0.1
        exec 3<>"/dev/tcp/$host/$port" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$host" >&3
        IFS= read -r -t 2 status <&3 || true
        [[ ${status:-} == *" 200"* ]]
    fi
) 2>/dev/null

ready=0
for _ in $(seq 60); do
    check_alive
    if http_ok "$HERALD_CAPTURE__OPS_ADDR" /readyz && http_ok "$HERALD_BROADCAST__OPS_ADDR" /readyz \
        && http_ok "$HERALD_CACHE__OPS_ADDR" /readyz && http_ok "$HERALD_GATEWAY__OPS_ADDR" /readyz; then
        ready=1
        break
    fi
    sleep 0.5
done
if ((ready)); then
    log "capture, broadcast, cache-api and gateway are ready"
else
    log "warning: services not ready after 30 s; continuing (see .dev/*.log)"
fi

# ---------------------------------------------------------------------------
# demo writes
# ---------------------------------------------------------------------------
# Reads one demo row through the cache API and prints the answer.
cache_read() { # slug
    command -v curl >/dev/null 2>&1 || return 0
    local body
    body=$(curl -fsS --max-time 2 -H "Authorization: Bearer $HERALD_CACHE_TOKEN" \
        "http://$HERALD_CACHE__HTTP_ADDR/v1/t/demo/r/user_by_slug?slug=$1" 2>&1) || body="error: $body"
    printf '[cache] GET user_by_slug?slug=%s -> %s\n' "$1" "$body"
}

log "changing a random res_users row every ${INTERVAL}s; watch the [l1] and [cache] lines. Ctrl-C to stop."
n=0
while true; do
    sleep "$INTERVAL"
    check_alive
    n=$((n + 1))
    row=$(psql_q -F $'\t' -c 'SELECT id, website_slug, name FROM public.res_users WHERE id > 100 AND website_slug IS NOT NULL ORDER BY random() LIMIT 1') || {
        log "#$n query failed; retrying"
        continue
    }
    if [[ -z $row ]]; then
        log "#$n res_users has no demo rows (ids above 100); adding them again"
        psql_q -c "$DEMO_ROWS_SQL" >/dev/null || true
        continue
    fi
    IFS=$'\t' read -r id slug name <<<"$row"
    if ((RANDOM % 3)); then
        new="${name% \#*} #$n"
        if psql_q -v v="$new" -v id="$id" >/dev/null <<<"UPDATE public.res_users SET name = :'v', updated_at = now() WHERE id = :id"; then
            log "#$n UPDATE res_users id=$id ($slug): name '$name' -> '$new'"
            sleep 0.2
            cache_read "$slug"
            cache_read "$slug"
        else
            log "#$n UPDATE of id=$id failed"
        fi
    else
        if [[ $slug == *-2 ]]; then new=${slug%-2}; else new="$slug-2"; fi
        if psql_q -v v="$new" -v id="$id" >/dev/null <<<"UPDATE public.res_users SET website_slug = :'v', updated_at = now() WHERE id = :id"; then
            log "#$n UPDATE res_users id=$id: website_slug '$slug' -> '$new' (tags res_users.website_slug=$slug and =$new)"
        else
            log "#$n rename of '$slug' to '$new' failed (slug taken?)"
        fi
    fi
done
