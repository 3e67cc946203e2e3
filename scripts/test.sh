#!/usr/bin/env bash
# README command 2: the same set-up as run.sh, in throwaway locations (a temp folder, free
# ports), then the whole test suite against the real SoftHSM2 token and the real Postgres.
# .ci/run calls exactly this script.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

kb_install_deps python3

WORK=$(mktemp -d /tmp/keybroker-test.XXXXXX)
chmod 755 "$WORK"   # the unprivileged Postgres user must reach $WORK/pg
cleanup() {
  kb_stop_postgres "$WORK/pg"
  [ -n "${KB_KEEP_TEST_DIR:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

kb_log "building keybroker and its tests (debug)"
cargo build --all-targets --quiet
BIN="$KB_ROOT/target/debug/keybroker"

kb_setup_softhsm "$WORK/softhsm"
kb_secret_file "$WORK/secrets/so.pin"
kb_secret_file "$WORK/secrets/user.pin"
export KEYBROKER_SO_PIN_FILE="$WORK/secrets/so.pin"
export KEYBROKER_PIN_FILE="$WORK/secrets/user.pin"
kb_setup_postgres "$WORK/pg" keybroker
# Its output shows the bootstrap admin's secret once: keep it out of the CI log.
kb_init_token "$BIN" "keybroker-test" >"$WORK/hsm-init.log"

# What the tests read: the token, its folder (fault tests copy it), the PIN, the database.
export KB_TEST_SOFTHSM_DIR="$WORK/softhsm"
export KB_TEST_WORK="$WORK"
export KEYBROKER_PIN
KEYBROKER_PIN=$(cat "$KEYBROKER_PIN_FILE")
SO_PIN=$(cat "$KEYBROKER_SO_PIN_FILE")
export RUST_LOG=${RUST_LOG:-info,keybroker=debug}

LOG="$WORK/test-run.log"
kb_log "running the test suite (log: $LOG)"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast --success-output final --failure-output final 2>&1 | tee "$LOG" || status=$?
else
  cargo test --no-fail-fast -- --nocapture 2>&1 | tee "$LOG" || status=$?
fi
[ "$status" -eq 0 ] || exit "$status"

# The whole run's output, server logs included, must not contain a PIN.
if grep -qF -e "$KEYBROKER_PIN" -e "$SO_PIN" "$LOG"; then
  kb_die "a PIN appears in the test log"
fi
kb_log "no PIN in the test log"
