#!/usr/bin/env bash
# README command 1: set everything up under .local/ (once) and serve https://127.0.0.1:8443.
# Ctrl-C stops the server and the local Postgres.
set -euo pipefail
# Ctrl-C also ends whatever reads our output (e.g. `| tee`); a write to it must not kill this
# script before its clean-up has stopped the server and Postgres.
trap '' PIPE
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

LOCAL="$KB_ROOT/.local"
LABEL=${KEYBROKER_TOKEN_LABEL:-keybroker}

kb_install_deps
mkdir -p "$LOCAL"
chmod 755 "$LOCAL"   # the unprivileged Postgres user must reach .local/pg

kb_log "building keybroker (release)"
cargo build --release --quiet
BIN="$KB_ROOT/target/release/keybroker"

# Which token: KEYBROKER_TOKEN=softhsm (default) or kryoptic, set up under .local/ with PINs
# of their own; or PKCS11_MODULE=/path/to/vendor/module.so for a token initialised already.
TOKEN=${KEYBROKER_TOKEN:-softhsm}
if [ -n "${PKCS11_MODULE:-}" ] && [ "$PKCS11_MODULE" != "$KB_SOFTHSM_MODULE" ]; then
  TOKEN=vendor
fi
case "$TOKEN" in
  softhsm) kb_setup_softhsm "$LOCAL/softhsm" ;;
  kryoptic) kb_build_kryoptic; kb_setup_kryoptic "$LOCAL/kryoptic" ;;
  vendor) kb_log "vendor module $PKCS11_MODULE: token '$LABEL' must be initialised already" ;;
  *) kb_die "KEYBROKER_TOKEN must be softhsm or kryoptic (or set PKCS11_MODULE to a vendor module)" ;;
esac
# Each token has its own PINs, database and bootstrap admin (SoftHSM2's without a prefix).
PREFIX=$([ "$TOKEN" = softhsm ] || echo "$TOKEN-")
if [ "$TOKEN" != vendor ]; then
  kb_secret_file "$LOCAL/secrets/${PREFIX}so.pin"
  kb_secret_file "$LOCAL/secrets/${PREFIX}user.pin"
  export KEYBROKER_SO_PIN_FILE="$LOCAL/secrets/${PREFIX}so.pin"
  export KEYBROKER_PIN_FILE="$LOCAL/secrets/${PREFIX}user.pin"
fi
CREDENTIALS="$LOCAL/${PREFIX}admin-credentials.json"

SERVER=
cleanup() {
  set +e
  if [ -n "$SERVER" ]; then
    kill -TERM "$SERVER" 2>/dev/null
    wait "$SERVER" 2>/dev/null
  fi
  kb_stop_postgres "$LOCAL/pg"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kb_setup_postgres "$LOCAL/pg" "keybroker$([ "$TOKEN" = softhsm ] || echo "_$TOKEN")"

export KEYBROKER_LISTEN=${KEYBROKER_LISTEN:-127.0.0.1:8443}
export KEYBROKER_PUBLIC_URL=${KEYBROKER_PUBLIC_URL:-https://$KEYBROKER_LISTEN}
# The first init prints a bootstrap admin client once and keeps it in .local for the README's
# examples (mode 0600).
kb_init_token "$BIN" "$LABEL" --admin-credentials-out "$CREDENTIALS"
"$BIN" dev-cert --dir "$LOCAL/tls" >/dev/null
export KEYBROKER_TLS_CERT="$LOCAL/tls/server.pem" KEYBROKER_TLS_KEY="$LOCAL/tls/server-key.pem"

kb_log "serving $KEYBROKER_PUBLIC_URL (trust $LOCAL/tls/ca.pem); Ctrl-C stops"
[ -f "$CREDENTIALS" ] && kb_log "admin client credentials: $CREDENTIALS"
"$BIN" serve &
SERVER=$!
wait "$SERVER"
