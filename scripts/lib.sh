# Shared by scripts/serve.sh and scripts/test.sh: make sure the tools are installed and that a
# PostgreSQL and a Redis answer, starting private ones under .local/ when the configured ones do
# not. Sourced, not run.
#
# Inputs (all optional):
#   LOYALTY_PG_ADMIN_URL  a Postgres server's maintenance database
#                         (default postgres://postgres@127.0.0.1:5432/postgres)
#   REDIS_URL             (default redis://127.0.0.1:6379)
# Outputs: LOYALTY_PG_ADMIN_URL and REDIS_URL point at servers that answer.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
PRIVATE_PG_PORT="${LOYALTY_PRIVATE_PG_PORT:-54329}"
PRIVATE_REDIS_PORT="${LOYALTY_PRIVATE_REDIS_PORT:-63799}"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pg_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

# Installs what is missing from Debian packages when we are root, or says what to run.
ensure_packages() {
    local missing=()
    pg_bindir >/dev/null || missing+=(postgresql)
    command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "installing ${missing[*]} (Debian packages)"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        else
            die "missing packages; run: sudo apt-get install -y ${missing[*]}"
        fi
    fi
    command -v cargo >/dev/null 2>&1 || die "Rust is not installed; see https://rustup.rs (Rust >= 1.94)"
}

pg_answers() { psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1; }
redis_answers() { [ "$(redis-cli -u "$1" ping 2>/dev/null)" = "PONG" ]; }

# Runs a command as the owner of the private cluster (PostgreSQL refuses to run as root).
as_pg_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start_private_postgres() {
    local bindir data="$LOCAL/postgres"
    bindir="$(pg_bindir)" || die "PostgreSQL server binaries not found"
    mkdir -p "$LOCAL"
    if [ ! -f "$data/PG_VERSION" ]; then
        log "creating a private PostgreSQL cluster in $data"
        mkdir -p "$data"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$data"
        as_pg_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    if ! as_pg_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "starting the private PostgreSQL on 127.0.0.1:$PRIVATE_PG_PORT"
        as_pg_owner "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
            -o "-p $PRIVATE_PG_PORT -c listen_addresses=127.0.0.1 -k $data -c max_connections=300 -c fsync=on" >/dev/null
    fi
}

ensure_postgres() {
    LOYALTY_PG_ADMIN_URL="${LOYALTY_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    if pg_answers "$LOYALTY_PG_ADMIN_URL"; then
        log "using PostgreSQL at ${LOYALTY_PG_ADMIN_URL%%\?*}"
    else
        log "no PostgreSQL answers at ${LOYALTY_PG_ADMIN_URL%%\?*}"
        start_private_postgres
        LOYALTY_PG_ADMIN_URL="postgres://postgres@127.0.0.1:$PRIVATE_PG_PORT/postgres"
        pg_answers "$LOYALTY_PG_ADMIN_URL" || die "the private PostgreSQL does not answer; see $LOCAL/postgres/server.log"
    fi
    export LOYALTY_PG_ADMIN_URL
}

ensure_redis() {
    REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
    if redis_answers "$REDIS_URL"; then
        log "using Redis at $REDIS_URL"
    else
        log "no Redis answers at $REDIS_URL; starting a private one on 127.0.0.1:$PRIVATE_REDIS_PORT"
        mkdir -p "$LOCAL/redis"
        redis-server --port "$PRIVATE_REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save "" \
            --appendonly no --dir "$LOCAL/redis" --logfile "$LOCAL/redis/redis.log" \
            --pidfile "$LOCAL/redis/redis.pid" >/dev/null
        REDIS_URL="redis://127.0.0.1:$PRIVATE_REDIS_PORT"
        for _ in $(seq 1 50); do redis_answers "$REDIS_URL" && break; sleep 0.1; done
        redis_answers "$REDIS_URL" || die "the private Redis does not answer; see $LOCAL/redis/redis.log"
    fi
    export REDIS_URL
}

# The URL of database $1 on the server of LOYALTY_PG_ADMIN_URL.
database_url() {
    local base="${LOYALTY_PG_ADMIN_URL%%\?*}"
    echo "${base%/*}/$1"
}

ensure_database() {
    local name="$1"
    if [ "$(psql "$LOYALTY_PG_ADMIN_URL" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$name'")" != "1" ]; then
        log "creating database $name"
        psql "$LOYALTY_PG_ADMIN_URL" -qc "CREATE DATABASE $name" >/dev/null
    fi
}

# What scripts/examples.sh needs besides the server's tools: Python 3 with venv (for
# examples/python-till) and Node.js with npm (for examples/node-app). Installs the missing ones
# from Debian packages when we are root, or says what to run.
ensure_example_packages() {
    local missing=() probe
    if ! command -v python3 >/dev/null 2>&1; then
        missing+=(python3 python3-venv)
    elif [ ! -x "$LOCAL/examples-venv/bin/python" ]; then
        # Debian's python3 imports venv and ensurepip without python3-venv, yet cannot make a
        # venv: only making one tells.
        probe="$(mktemp -d)"
        python3 -m venv "$probe/venv" >/dev/null 2>&1 || missing+=(python3-venv)
        rm -rf "$probe"
    fi
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "installing ${missing[*]} (Debian packages)"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        else
            die "missing packages; run: sudo apt-get install -y ${missing[*]}"
        fi
    fi
}
