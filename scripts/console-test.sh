#!/usr/bin/env bash
# The officer's console in a real browser: Debian's chromium, headless, driven by playwright-core
# (tests/console/, run with `node --test`) against a throwaway broker on SoftHSM2 (as
# clients-test.sh makes one). Installs chromium and the suite's npm packages if missing; runs on
# its own too (it builds the debug binary if needed). The screenshots of every page are kept in
# the run's output folder, printed at the end (KB_CONSOLE_OUT chooses it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"
kb_install_deps curl
kb_install_packages chromium
command -v npm >/dev/null 2>&1 || kb_install_packages nodejs npm

kb_throwaway_work console
# Outside the throwaway folder, so the screenshots outlive the run.
OUT=${KB_CONSOLE_OUT:-/tmp/keybroker-console-screenshots/$(date -u +%Y%m%dT%H%M%SZ)}

(cd tests/console && npm ci --no-audit --no-fund --loglevel=error)

cargo build --quiet
BIN="$KB_ROOT/target/debug/keybroker"
unset SOFTHSM2_CONF KRYOPTIC_CONF KEYBROKER_PIN KB_FAULTS_MODULE KB_FAULTS_CONTROL PKCS11_MODULE
kb_setup_throwaway_broker "$BIN" "$WORK" keybroker-console
RUST_LOG=${RUST_LOG:-warn} kb_serve_background "$BIN" "$WORK"

KB_ADMIN_ID=$(sed -n 's/.*"client_id": *"\([^"]*\)".*/\1/p' "$WORK/admin.json")
KB_ADMIN_SECRET=$(sed -n 's/.*"client_secret": *"\([^"]*\)".*/\1/p' "$WORK/admin.json")
[ -n "$KB_ADMIN_ID" ] && [ -n "$KB_ADMIN_SECRET" ] || kb_die "no bootstrap admin credentials in $WORK/admin.json"
kb_log "console tests in chromium against $KB_URL"
KB_CONSOLE_URL=$KB_URL KB_CONSOLE_CERT_FILE="$WORK/tls/server.pem" KB_CONSOLE_OUT=$OUT \
  KB_ADMIN_ID=$KB_ADMIN_ID KB_ADMIN_SECRET=$KB_ADMIN_SECRET NODE_EXTRA_CA_CERTS="$WORK/tls/ca.pem" \
  node --test --test-concurrency=1 tests/console/console.test.mjs \
  || kb_die "the console suite failed (screenshots so far: $OUT; broker log: $WORK/server.log)"
kb_log "console suite passed; screenshots of every page: $OUT"
