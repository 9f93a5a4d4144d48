#!/usr/bin/env bash
# Quick start, command 2: runs every test (unit, integration against real PostgreSQL and Redis,
# the reliability suite, and the client examples of scripts/examples.sh).
#
# Uses the PostgreSQL and Redis that answer at LOYALTY_PG_ADMIN_URL / REDIS_URL, or starts
# private ones under .local/. Each test makes its own database from a migrated template and its
# own Redis key prefix, so runs never see each other's data. Extra arguments go to `cargo test`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_packages
ensure_postgres
ensure_redis
export TEST_DATABASE_URL="$LOYALTY_PG_ADMIN_URL"
export TEST_REDIS_URL="$REDIS_URL"
# loyalty-bench's own tests make (and drop) throwaway databases through this one.
export LOYALTY_BENCH_TEST_DATABASE_URL="$LOYALTY_PG_ADMIN_URL"

# Databases of earlier runs that were interrupted before they could drop their own.
psql "$TEST_DATABASE_URL" -Atqc "SELECT datname FROM pg_database
                                 WHERE datname LIKE 'loyalty\_t\_%' OR datname LIKE 'loyalty\_bench\_t\_%'" |
    while read -r name; do
        psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null 2>&1 || true
    done

cd "$ROOT"
log "running the tests"
cargo test --workspace --locked "$@"

# The client examples (examples/python-till, examples/node-app) against a real server, with
# the binary the tests just built. Closes with `examples: N passed, M failed`.
LOYALTY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/loyalty" "$ROOT/scripts/examples.sh"
