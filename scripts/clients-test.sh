#!/usr/bin/env bash
# The client libraries against a real broker: a throwaway broker on SoftHSM2 (as contract.sh
# makes one), a client registered for them, then each library's own tests (clients/*/test.sh)
# and the interoperability of their envelopes (one encrypts, the other decrypts). Called by
# test.sh; runs on its own too (it builds the debug binary if needed).
#
# Each clients/<library>/test.sh gets, in its environment, a broker and a client with the scopes
# datakey, wrap, unwrap, rewrap and random:
#   KEYBROKER_URL, KEYBROKER_CA_FILE, KEYBROKER_CLIENT_ID, KEYBROKER_CLIENT_SECRET
# and the bootstrap admin's token in KB_ADMIN_TOKEN (for tests that register clients of their own).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"
kb_install_deps python3 curl

kb_throwaway_work clients

cargo build --quiet
BIN="$KB_ROOT/target/debug/keybroker"
unset SOFTHSM2_CONF KRYOPTIC_CONF KEYBROKER_PIN KB_FAULTS_MODULE KB_FAULTS_CONTROL PKCS11_MODULE
kb_setup_throwaway_broker "$BIN" "$WORK" keybroker-clients
# The admin token handed to the libraries' tests lasts the whole run.
KEYBROKER_TOKEN_TTL_SECS=3600 RUST_LOG=${RUST_LOG:-warn} kb_serve_background "$BIN" "$WORK"

ADMIN_TOKEN=$(kb_access_token "$WORK/admin.json" "$KB_URL" "$WORK/tls/ca.pem")
[ -n "$ADMIN_TOKEN" ] || kb_die "no access token for the bootstrap admin"
install -m 600 /dev/null "$WORK/client.json"
curl -sf --cacert "$WORK/tls/ca.pem" -H 'content-type: application/json' -K - \
  "$KB_URL/v1/admin/clients" >"$WORK/client.json" \
  -d '{"name": "client-libraries", "ip_mode": "none", "scopes": ["datakey", "wrap", "unwrap", "rewrap", "random"]}' \
  <<<"header = \"authorization: Bearer $ADMIN_TOKEN\""
export KEYBROKER_URL=$KB_URL KEYBROKER_CA_FILE="$WORK/tls/ca.pem" KB_ADMIN_TOKEN=$ADMIN_TOKEN
KEYBROKER_CLIENT_ID=$(sed -n 's/.*"client_id": *"\([^"]*\)".*/\1/p' "$WORK/client.json")
KEYBROKER_CLIENT_SECRET=$(sed -n 's/.*"client_secret": *"\([^"]*\)".*/\1/p' "$WORK/client.json")
[ -n "$KEYBROKER_CLIENT_ID" ] && [ -n "$KEYBROKER_CLIENT_SECRET" ] || kb_die "registering the libraries' client failed"
export KEYBROKER_CLIENT_ID KEYBROKER_CLIENT_SECRET

for lib in clients/*/test.sh; do
  [ -f "$lib" ] || continue
  kb_log "client library tests: $lib against $KB_URL"
  bash "$lib" || kb_die "$lib failed"
done
# The envelope is one format: each library decrypts what the other encrypted, under the same
# context, and neither opens it under another. (The Python package is the one its test.sh just
# installed; the Rust side is its `envelope` example.)
if [ -f clients/python/test.sh ] && [ -f clients/rust/test.sh ]; then
  kb_log "envelope interoperability: Python <-> Rust"
  PY="$KB_CACHE_DIR/pyclient-pytest-$(sed -n 's/^PYTEST_VERSION=//p' clients/python/test.sh)/bin/python"
  cargo build --quiet -p keybroker-client --example envelope
  RS="$KB_ROOT/target/debug/examples/envelope"
  python_cli() { "$PY" -m keybroker "$@"; }
  head -c 100000 /dev/urandom >"$WORK/message"
  ctx=(--context tenant=acme --context "purpose=interop test")
  python_cli encrypt "${ctx[@]}" <"$WORK/message" >"$WORK/by-python"
  "$RS" encrypt "${ctx[@]}" <"$WORK/message" >"$WORK/by-rust"
  "$RS" decrypt "${ctx[@]}" <"$WORK/by-python" | cmp -s - "$WORK/message" ||
    kb_die "Rust did not decrypt Python's envelope to the message"
  python_cli decrypt "${ctx[@]}" <"$WORK/by-rust" | cmp -s - "$WORK/message" ||
    kb_die "Python did not decrypt Rust's envelope to the message"
  cmp -s "$WORK/by-python" "$WORK/by-rust" && kb_die "two envelopes of one message are the same bytes (nonce or key reused)"
  for cli in python_cli "$RS"; do
    if $cli decrypt --context tenant=other <"$WORK/by-python" >/dev/null 2>"$WORK/refused"; then
      kb_die "$cli decrypted under another context"
    fi
    grep -q "context_mismatch" "$WORK/refused" || { cat "$WORK/refused" >&2; kb_die "$cli: another context was not refused with context_mismatch"; }
  done
  kb_log "envelopes cross both ways (100,000 bytes), and another context is refused by both"
fi
kb_log "client libraries passed"
