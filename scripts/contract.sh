#!/usr/bin/env bash
# The served OpenAPI document as a contract: schemathesis (PyPI) runs every check, stateful
# links included, against a broker on SoftHSM2 with the bootstrap admin's token, and must find
# nothing. Called by test.sh; runs on its own too (it builds the debug binary if needed).
#
#   KB_CONTRACT_EXAMPLES   test cases per operation and phase (default 50)
#   KB_CONTRACT_SEED       schemathesis' random seed (default: a new one, printed)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

EXAMPLES=${KB_CONTRACT_EXAMPLES:-50}
SEED=${KB_CONTRACT_SEED:-$RANDOM$RANDOM}
SCHEMATHESIS_VERSION=4.32.5
kb_install_deps python3 curl
# In a virtual environment of its own (kept in the cache), so neither the system's Python nor
# another project's packages are touched.
VENV="$KB_CACHE_DIR/schemathesis-$SCHEMATHESIS_VERSION"
if [ ! -x "$VENV/bin/schemathesis" ]; then
  kb_log "installing schemathesis $SCHEMATHESIS_VERSION (PyPI) into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
schemathesis() { "$VENV/bin/schemathesis" "$@"; }

kb_throwaway_work contract

cargo build --quiet
BIN="$KB_ROOT/target/debug/keybroker"
unset SOFTHSM2_CONF KRYOPTIC_CONF KEYBROKER_PIN KB_FAULTS_MODULE KB_FAULTS_CONTROL PKCS11_MODULE
kb_setup_softhsm "$WORK/softhsm"
kb_secret_file "$WORK/secrets/so.pin"
kb_secret_file "$WORK/secrets/user.pin"
export KEYBROKER_SO_PIN_FILE="$WORK/secrets/so.pin" KEYBROKER_PIN_FILE="$WORK/secrets/user.pin"
kb_setup_postgres "$WORK/pg" keybroker
install -m 600 /dev/null "$WORK/admin.json"
kb_init_token "$BIN" keybroker-contract --admin-credentials-out "$WORK/admin.json" >"$WORK/init.log"
"$BIN" dev-cert --dir "$WORK/tls" >/dev/null

PORT=$(kb_free_port)
URL="https://127.0.0.1:$PORT"
# Batches of at most 50 items and bodies up to 16 MiB: a schema-valid batch (50 items, each
# with a full context) then always fits, so the body limit, like the rate limits below, answers
# none of the fuzzer's requests (413 has tests of its own in the suite). Its keep-alive
# connections may idle for long while it generates (the idle deadline has its own tests too: a
# connection closed just as the client reuses it is a transport race, not an answer), and its
# token lasts the whole run.
KEYBROKER_TLS_CERT="$WORK/tls/server.pem" KEYBROKER_TLS_KEY="$WORK/tls/server-key.pem" \
  KEYBROKER_LISTEN="127.0.0.1:$PORT" KEYBROKER_PUBLIC_URL="$URL" RUST_LOG=${RUST_LOG:-warn} \
  KEYBROKER_MAX_BATCH=50 KEYBROKER_MAX_BODY_BYTES=$((16 * 1024 * 1024)) \
  KEYBROKER_IDLE_TIMEOUT_MS=3600000 KEYBROKER_TOKEN_TTL_SECS=3600 \
  "$BIN" serve 2>"$WORK/server.log" &
KB_SERVER_PID=$!
for _ in $(seq 300); do curl -sf --cacert "$WORK/tls/ca.pem" "$URL/readyz" >/dev/null && break; sleep 0.2; done
curl -sf --cacert "$WORK/tls/ca.pem" "$URL/readyz" >/dev/null || { cat "$WORK/server.log" >&2; kb_die "the broker did not become ready"; }

TOKEN=$(kb_access_token "$WORK/admin.json" "$URL" "$WORK/tls/ca.pem")
[ -n "$TOKEN" ] || kb_die "no access token for the bootstrap admin"
# A fuzzer is one very busy client: the rate limits and the automatic response are lifted so
# that they answer none of its requests (their own tests are in the suite).
curl -sf --cacert "$WORK/tls/ca.pem" -X PUT -H 'content-type: application/json' \
  -H "authorization: Bearer $TOKEN" "$URL/v1/admin/security-settings" \
  -d '{"per_ip_per_second": 1000000, "per_ip_burst": 1000000, "per_client_per_second": 1000000,
       "per_client_burst": 1000000, "block_after_violations": 1000000, "anomaly_refusals": 0}' >/dev/null

# The fuzzer must not switch its own client off (see schemathesis_hooks.py).
KB_CONTRACT_ADMIN_ID=$(sed -n 's/.*"client_id": *"\([^"]*\)".*/\1/p' "$WORK/admin.json")
export KB_CONTRACT_ADMIN_ID SCHEMATHESIS_HOOKS="$KB_ROOT/scripts/schemathesis_hooks.py"

# One run over every operation but the security settings, then one over those alone: a
# settings change generated in the first could turn the automatic response back on, and the
# fuzzer's refused unwraps (forged blobs) would then disable its own client mid-run.
SETTINGS="PUT /v1/admin/security-settings"
cd "$WORK"   # schemathesis keeps a cache in the working directory
total=0
run_schemathesis() {
  local name=$1 status=0 cases
  shift
  kb_log "schemathesis $SCHEMATHESIS_VERSION ($name) against $URL/openapi.json: every check, $EXAMPLES examples per operation, seed $SEED"
  # Not /console: HTML for people, whose forms need a session cookie and its CSRF token, so a fuzzer's are refused by design.
  schemathesis --config-file "$KB_ROOT/scripts/schemathesis.toml" run "$URL/openapi.json" --exclude-path-regex '^/console' \
    --tls-verify "$WORK/tls/ca.pem" -H "Authorization: Bearer $TOKEN" --checks all \
    --max-examples "$EXAMPLES" --seed "$SEED" --workers 2 --report ndjson \
    --report-dir "$WORK/report-$name" "$@" ${KB_CONTRACT_ARGS:-} 2>&1 | tee "$WORK/schemathesis-$name.log" || status=$?
  if [ "$status" -ne 0 ]; then
    [ -n "${KB_KEEP_TEST_DIR:-}" ] && kb_log "kept $WORK"
    kb_die "schemathesis found contract failures ($name, seed $SEED)"
  fi
  cases=$(sed -n 's/^ *\([0-9]*\) generated, .*/\1/p' "$WORK/schemathesis-$name.log" | tail -1)
  total=$((total + ${cases:-0}))
}
run_schemathesis all-but-settings --exclude-name "$SETTINGS"
run_schemathesis settings --include-name "$SETTINGS" --phases examples,coverage,fuzzing
kb_log "contract held: schemathesis ran $total cases (seed $SEED) with no failure"
