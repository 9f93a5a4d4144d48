#!/usr/bin/env bash
# Quick start, command 1: runs the service on this machine.
#
# Installs what is missing (as root, from Debian packages), uses the PostgreSQL and Redis that
# answer at LOYALTY_PG_ADMIN_URL / REDIS_URL or starts private ones under .local/, applies the
# migrations, creates a demo merchant (once; its keys are kept in .local/demo.env), prints the
# keys and a ready example, and serves on LOYALTY_LISTEN (default 127.0.0.1:50051).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_packages
ensure_postgres
ensure_redis
ensure_database loyalty
export DATABASE_URL="${DATABASE_URL:-$(database_url loyalty)}"
export REDIS_URL

log "building (release)"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p loyalty
BIN="$ROOT/target/release/loyalty"
"$BIN" migrate >/dev/null

DEMO="$LOCAL/demo.env"
demo_merchant_exists() {
    [ -f "$DEMO" ] && source "$DEMO" &&
        [ "$(psql "$DATABASE_URL" -Atqc "SELECT count(*) FROM api_keys WHERE id IN ($ADMIN_KEY_ID, $POS_KEY_ID, $APP_KEY_ID) AND revoked_at IS NULL" 2>/dev/null)" = "3" ]
}
if ! demo_merchant_exists; then
    log "creating the demo merchant"
    mkdir -p "$LOCAL"
    merchant_json="$("$BIN" merchant create "Demo Café" --currency EUR --json)"
    MERCHANT_ID="$(sed -E 's/.*"merchant_id":([0-9]+).*/\1/' <<<"$merchant_json")"
    ADMIN_KEY="$(sed -E 's/.*"admin_key":"([^"]+)".*/\1/' <<<"$merchant_json")"
    ADMIN_KEY_ID="$(sed -E 's/.*"admin_key_id":([0-9]+).*/\1/' <<<"$merchant_json")"
    pos_json="$("$BIN" key create --merchant "$MERCHANT_ID" --scope pos --json)"
    POS_KEY="$(sed -E 's/.*"key":"([^"]+)".*/\1/' <<<"$pos_json")"
    POS_KEY_ID="$(sed -E 's/.*"key_id":([0-9]+).*/\1/' <<<"$pos_json")"
    app_json="$("$BIN" key create --merchant "$MERCHANT_ID" --scope app --json)"
    APP_KEY="$(sed -E 's/.*"key":"([^"]+)".*/\1/' <<<"$app_json")"
    APP_KEY_ID="$(sed -E 's/.*"key_id":([0-9]+).*/\1/' <<<"$app_json")"
    umask 077
    cat >"$DEMO" <<ENV
MERCHANT_ID=$MERCHANT_ID
ADMIN_KEY=$ADMIN_KEY
ADMIN_KEY_ID=$ADMIN_KEY_ID
POS_KEY=$POS_KEY
POS_KEY_ID=$POS_KEY_ID
APP_KEY=$APP_KEY
APP_KEY_ID=$APP_KEY_ID
ENV
fi
source "$DEMO"

LISTEN="${LOYALTY_LISTEN:-127.0.0.1:50051}"
cat >&2 <<INFO

Demo merchant $MERCHANT_ID (keys kept in .local/demo.env):
  admin key: $ADMIN_KEY
  pos key:   $POS_KEY
  app key:   $APP_KEY

Try it (grpcurl uses server reflection):
  grpcurl -plaintext -H "authorization: Bearer $POS_KEY" -d '{
    "external_id": "card-42", "purchase_id": "receipt-1", "store_id": "store-1",
    "occurred_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "currency": "EUR", "total_minor": 1250,
    "lines": [{"sku": "latte", "category": "coffee", "quantity": 1, "amount_minor": 1250}]
  }' $LISTEN loyalty.v1.CheckoutService/RecordPurchase
  grpcurl -plaintext -H "authorization: Bearer $APP_KEY" -d '{"external_id": "card-42"}' \\
    $LISTEN loyalty.v1.MemberService/GetBalance

Metrics: http://${LOYALTY_METRICS_LISTEN:-127.0.0.1:9464}/metrics    Stop: Ctrl-C

INFO
exec "$BIN" serve
