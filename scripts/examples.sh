#!/usr/bin/env bash
# Runs the client examples against a real server, as tests: examples/python-till (the till
# flow, Python, grpcio) and examples/node-app (the app reader, Node, @grpc/grpc-js).
#
# Installs what they need (a Python venv under .local/, `npm ci`), builds the server, gives it
# a database of its own (dropped afterwards) and a Redis key prefix of its own, starts it on a
# free port, creates a merchant and its keys with the CLI, sets the program, runs both
# examples, stops the server and prints `examples: N passed, M failed`. Exits non-zero when
# one failed. Keys live in this script's variables and the examples' environment only; they
# are never printed.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

started=$SECONDS
ensure_packages
ensure_example_packages
ensure_postgres
ensure_redis

WORK="$LOCAL/examples"
mkdir -p "$WORK"

# The examples' own dependencies, reinstalled only when their pins change.
VENV="$LOCAL/examples-venv" # the path ensure_example_packages looks for
REQS="$ROOT/examples/python-till/requirements.txt"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQS" "$VENV/requirements.txt"; then
    log "installing the Python till's requirements into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS"
    cp "$REQS" "$VENV/requirements.txt"
fi
NODE_APP="$ROOT/examples/node-app"
if ! cmp -s "$NODE_APP/package-lock.json" "$NODE_APP/node_modules/.examples-lock.json"; then
    log "installing the Node app's packages (npm ci)"
    (cd "$NODE_APP" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    cp "$NODE_APP/package-lock.json" "$NODE_APP/node_modules/.examples-lock.json"
fi

# LOYALTY_BIN: a server binary built already (scripts/test.sh passes the one `cargo test` just
# built, whose features may differ from a `-p loyalty` build's, saving a rebuild).
BIN="${LOYALTY_BIN:-}"
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    log "building the server"
    cargo build --locked --quiet --manifest-path "$ROOT/Cargo.toml" -p loyalty --bin loyalty
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/loyalty"
fi

# A database and a Redis prefix of this run's own, so it sees nothing of serve.sh's or the
# tests' data, and they nothing of its.
DB="loyalty_examples_$$"
PREFIX="loyalty-examples-$$"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    psql "$LOYALTY_PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:*" 2>/dev/null |
        xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Databases of earlier runs that were killed before they could drop their own (runs from other
# checkouts may be going on beside this one: only those whose process is gone).
psql "$LOYALTY_PG_ADMIN_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'loyalty\_examples\_%'" |
    while read -r name; do
        kill -0 "${name##*_}" 2>/dev/null ||
            psql "$LOYALTY_PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null 2>&1 || true
    done
psql "$LOYALTY_PG_ADMIN_URL" -qc "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL="$(database_url "$DB")"
export REDIS_URL
LOG="$WORK/server.log"
: >"$LOG"
"$BIN" migrate >/dev/null 2>>"$LOG"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
METRICS_PORT="$(free_port)"
log "starting the server on 127.0.0.1:$PORT (log: ${LOG#"$ROOT"/})"
LOYALTY_LISTEN="127.0.0.1:$PORT" LOYALTY_METRICS_LISTEN="127.0.0.1:$METRICS_PORT" \
    LOYALTY_REDIS_PREFIX="$PREFIX" "$BIN" serve >>"$LOG" 2>&1 &
SERVER_PID=$!
ready=""
for _ in $(seq 1 300); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if LOYALTY_HEALTH_ENDPOINT="http://127.0.0.1:$PORT" "$BIN" health >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || { tail -n 20 "$LOG" >&2; die "the server did not become healthy"; }

# A merchant and its keys, made with the operator CLI like a real deployment does (the keys
# are on its stdout, captured here; its log lines, which hold none, go to the server's log).
json_field() { sed -E "s/.*\"$1\":\"?([^\",}]+)\"?.*/\1/" <<<"$2"; }
merchant_json="$("$BIN" merchant create "Examples Café" --currency EUR --json 2>>"$LOG")"
MERCHANT_ID="$(json_field merchant_id "$merchant_json")"
ADMIN_KEY="$(json_field admin_key "$merchant_json")"
pos_json="$("$BIN" key create --merchant "$MERCHANT_ID" --scope pos --json 2>>"$LOG")"
POS_KEY="$(json_field key "$pos_json")"
app_json="$("$BIN" key create --merchant "$MERCHANT_ID" --scope app --json 2>>"$LOG")"
APP_KEY="$(json_field key "$app_json")"
unset merchant_json pos_json app_json
[ -n "$ADMIN_KEY" ] && [ -n "$POS_KEY" ] && [ -n "$APP_KEY" ] || die "creating the merchant's keys failed"

export LOYALTY_ENDPOINT="127.0.0.1:$PORT"
CUSTOMER="card-$(date +%s)-$$"
passed=0
failed=0
# True when a secret shows in one of the files (the examples' output, the server's log): no key
# by value, and nothing shaped like a key (lk_...), a customer token (lct_...) or a gift code.
leaks() {
    grep -qF -e "$ADMIN_KEY" -e "$POS_KEY" -e "$APP_KEY" "$@" ||
        grep -qE '\b(lk|lct)_[A-Za-z0-9]|\b[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]\b' "$@"
}
record() {
    if [ "$2" -eq 0 ] && leaks "$WORK/$1.out" "$WORK/setup.out" "$LOG"; then
        failed=$((failed + 1))
        log "$1: FAILED (a key, token or gift code appears in its output or the server's log)"
    elif [ "$2" -eq 0 ]; then
        passed=$((passed + 1))
        log "$1: passed"
    else
        failed=$((failed + 1))
        log "$1: FAILED (exit $2)"
    fi
}

log "setting the merchant's program (examples/python-till/setup_program.py)"
gifts=0
setup=0
setup_out="$(cd "$ROOT/examples/python-till" &&
    LOYALTY_ADMIN_KEY="$ADMIN_KEY" LOYALTY_CUSTOMER="$CUSTOMER" "$VENV/bin/python" setup_program.py 2>&1)" || setup=$?
printf '%s\n' "$setup_out" | tee "$WORK/setup.out"
grep -q '^gifts: on' <<<"$setup_out" && gifts=1
if [ "$setup" -ne 0 ]; then
    log "setting the program failed (exit $setup): neither example can run"
    failed=2
else
    log "python-till: the till flow (examples/python-till/till.py)"
    status=0
    (cd "$ROOT/examples/python-till" &&
        LOYALTY_POS_KEY="$POS_KEY" LOYALTY_CUSTOMER="$CUSTOMER" LOYALTY_EXPECT_GIFTS="$gifts" \
            "$VENV/bin/python" till.py) 2>&1 | tee "$WORK/python-till.out" || status=$?
    record python-till "$status"

    log "node-app: the app reader (examples/node-app/app.js)"
    status=0
    expectations=()
    # What the till leaves behind, when it ran through.
    [ "$failed" -eq 0 ] && expectations=(LOYALTY_EXPECT_AVAILABLE=400 LOYALTY_EXPECT_NEXT_EXPIRY=1 LOYALTY_EXPECT_GIFTS="$gifts")
    (cd "$NODE_APP" &&
        env "${expectations[@]}" LOYALTY_APP_KEY="$APP_KEY" LOYALTY_CUSTOMER="$CUSTOMER" node app.js) 2>&1 |
        tee "$WORK/node-app.out" || status=$?
    record node-app "$status"
fi

if [ "$failed" -gt 0 ]; then
    log "the server's log (last 30 lines):"
    tail -n 30 "$LOG" >&2
fi
cleanup
SERVER_PID=""
log "examples took $((SECONDS - started)) s"
echo "examples: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
