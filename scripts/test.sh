#!/usr/bin/env bash
# README command 2: the same set-up as run.sh, in throwaway locations (a temp folder, free
# ports), then the whole test suite against a real Postgres and a real token: on SoftHSM2, on
# Kryoptic (a second PKCS#11 implementation), and on each of them behind the fault-injecting
# module (tests/pkcs11-faults) emulating two production-HSM habits: a token that makes its own AES-GCM
# IV and writes it back (AWS CloudHSM; `+iv-token`), and one that refuses a caller's IV (FIPS
# mode; `+iv-reject`). Fault tests reach the real token through the same module. Before each
# run, `keybroker hsm probe` prints what the token offers. .ci/run calls exactly this.
#
#   KB_TEST_TOKENS   the runs (default: softhsm, softhsm+iv-token, softhsm+iv-reject, then the
#                    same three on kryoptic)
#   KB_TEST_FILTER   run only the tests whose names contain this (default: all, and then the
#                    contract run of scripts/contract.sh too)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

TOKENS=${KB_TEST_TOKENS:-softhsm softhsm+iv-token softhsm+iv-reject kryoptic kryoptic+iv-token kryoptic+iv-reject}
kb_install_deps python3 openssl
WHOLE=${KB_TEST_FILTER:-whole}   # "whole" when no filter picks some tests only
# The outside tools of the whole run's later steps: Debian's chromium and Node.js for the
# console's Playwright suite (its npm packages come with `npm ci` in console-test.sh),
# schemathesis and pytest from PyPI (into virtual environments in KB_CACHE_DIR, by
# contract.sh and clients/python/test.sh), cargo-fuzz from crates.io (by fuzz.sh).
if [ "$WHOLE" = whole ]; then
  kb_install_packages chromium
  command -v npm >/dev/null 2>&1 || kb_install_packages nodejs npm
fi

WORK=$(mktemp -d /tmp/keybroker-test.XXXXXX)
chmod 755 "$WORK"   # the unprivileged Postgres user must reach $WORK/pg
BACKGROUND=()
cleanup() {
  local pid
  # (each in a process group of its own, by setsid: the group goes, cargo and rustc with it)
  for pid in "${BACKGROUND[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  kb_stop_postgres "$WORK/pg"
  [ -n "${KB_KEEP_TEST_DIR:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# Two long builds the first runs do not need, Kryoptic (once per cache) and the fuzz targets,
# run in the background at the lowest priority: they take the cores the suite leaves idle
# (waiting on Postgres, the token and its own deadlines) and hardly slow it. What they install
# from Debian is installed first, so that no two apt runs meet.
KRYOPTIC_BUILD= FUZZ_BUILD=
case " $TOKENS " in
  *" kryoptic"*)
    kb_install_packages $KB_KRYOPTIC_BUILD_PACKAGES
    setsid nice -n 19 bash -c 'source scripts/lib.sh && kb_build_kryoptic' >"$WORK/kryoptic-build.log" 2>&1 &
    KRYOPTIC_BUILD=$!
    BACKGROUND+=("$KRYOPTIC_BUILD")
    ;;
esac
if [ "$WHOLE" = whole ]; then
  KB_FUZZ_BUILD_ONLY=1 setsid nice -n 19 ./scripts/fuzz.sh >"$WORK/fuzz-build.log" 2>&1 &
  FUZZ_BUILD=$!
  BACKGROUND+=("$FUZZ_BUILD")
fi
# Waits for the background build with pid PID (its log in LOG), and fails with its log if it did.
wait_for_build() {
  local pid=$1 log=$2 what=$3 status=0
  kb_log "waiting for the background build of $what"
  wait "$pid" || status=$?
  [ "$status" -eq 0 ] || { cat "$log" >&2; kb_die "building $what failed"; }
}

kb_log "building keybroker, its tests and the fault-injecting PKCS#11 module (debug)"
cargo build --all-targets --quiet
cargo build --quiet -p pkcs11-faults
BIN="$KB_ROOT/target/debug/keybroker"
export KB_TEST_FAULT_MODULE="$KB_ROOT/target/debug/libkb_pkcs11_faults.so"
export RUST_LOG=${RUST_LOG:-info,keybroker=debug}

# Test modules that never seal or open through the token (see run_suite).
EMULATION_SKIPS='limits|oauth|audit|listener|request_log|contract|auth_cache|metrics|operability|openapi|test_databases'

# One run of the whole suite on RUN (a token, softhsm or kryoptic, optionally +iv-token or
# +iv-reject), with its own token, PINs and database. Exits on failure; checks the run's log for
# the PINs.
run_suite() {
  local run=$1 token=${1%%+*} vendor= dir="$WORK/$1"
  case "$run" in
    *+iv-token) vendor="gcm_iv = token" ;;
    *+iv-reject) vendor="gcm_iv = reject" ;;
    *+*) kb_die "unknown emulation in '$run' (+iv-token, +iv-reject)" ;;
  esac
  # Nothing of the previous run's token may leak into this one (a PIN in the environment wins
  # over the PIN file).
  unset SOFTHSM2_CONF KRYOPTIC_CONF KEYBROKER_PIN KB_FAULTS_MODULE KB_FAULTS_CONTROL KB_TEST_VENDOR_FAULTS
  case "$token" in
    softhsm) kb_setup_softhsm "$dir" ;;
    kryoptic) kb_setup_kryoptic "$dir" ;;
    *) kb_die "unknown token '$token' in KB_TEST_TOKENS (softhsm, kryoptic)" ;;
  esac
  local name=${run//+/_}; name=${name//-/_}
  kb_secret_file "$WORK/secrets/$name-so.pin"
  kb_secret_file "$WORK/secrets/$name-user.pin"
  export KEYBROKER_SO_PIN_FILE="$WORK/secrets/$name-so.pin"
  export KEYBROKER_PIN_FILE="$WORK/secrets/$name-user.pin"
  # A throwaway cluster need not survive a crash of the machine: without fsync, the checkpoint
  # that each test database's DROP forces (Postgres 15) costs ~0.1 s instead of over 1 s on a
  # loaded machine, and commits stop waiting for the disk.
  KB_PG_SETTINGS="fsync=off full_page_writes=off synchronous_commit=off" \
    kb_setup_postgres "$WORK/pg" "keybroker_$name"
  if [ -n "$vendor" ]; then
    # Every token call of the run, the suite's and its child brokers', goes through the fault
    # module, which acts as the vendor would. The token itself is initialised directly.
    "$BIN" hsm init-token --token-label keybroker-test >/dev/null
    export KB_FAULTS_MODULE=$PKCS11_MODULE PKCS11_MODULE=$KB_TEST_FAULT_MODULE
    export KB_FAULTS_CONTROL="$dir/vendor.conf" KB_TEST_VENDOR_FAULTS="$vendor"
    printf '%s\n' "$vendor" >"$KB_FAULTS_CONTROL"
  fi
  # Its output shows the bootstrap admin's secret once: keep it out of the CI log.
  # ($WORK is world-readable for Postgres' sake, so the file is made private first; not in a
  # subshell, whose exports would be lost.)
  install -m 600 /dev/null "$WORK/$name-hsm-init.log"
  kb_init_token "$BIN" "keybroker-test" >"$WORK/$name-hsm-init.log"
  grep -qF "self-test passed" "$WORK/$name-hsm-init.log" || kb_die "hsm init did not pass its self-test on $run"
  kb_log "hsm probe on $run${vendor:+ (fault module: $vendor)}"
  "$BIN" hsm probe | sed 's/^/  /'

  # What the tests read: which token and where its storage is (fault tests copy it), the PIN,
  # the database.
  export KB_TEST_TOKEN=$token KB_TEST_TOKEN_DIR=$dir KB_TEST_WORK=$WORK
  export KEYBROKER_PIN
  KEYBROKER_PIN=$(cat "$KEYBROKER_PIN_FILE")
  local so_pin log="$WORK/test-run-$name.log" status=0
  so_pin=$(cat "$KEYBROKER_SO_PIN_FILE")

  # The emulations change only how the token treats AES-GCM IVs: their runs leave out the
  # modules whose tests never seal or open through it (HTTP, tokens, limits, audit alone).
  local only=()
  if [ -n "$vendor" ] && [ "$WHOLE" = whole ]; then
    only=(-E "not test(/^($EMULATION_SKIPS)::/)")
  fi
  kb_log "running the test suite on $run${only:+ (without: $EMULATION_SKIPS)} (log: $log)"
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast --success-output final --failure-output final "${only[@]}" ${KB_TEST_FILTER:+"$KB_TEST_FILTER"} 2>&1 | tee "$log" || status=$?
  else
    cargo test --no-fail-fast -- --nocapture ${KB_TEST_FILTER:+"$KB_TEST_FILTER"} 2>&1 | tee "$log" || status=$?
  fi
  [ "$status" -eq 0 ] || kb_die "the suite failed on $run"
  check_test_databases "$run"

  # The whole run's output, server logs included, must not contain a PIN.
  if grep -qF -e "$KEYBROKER_PIN" -e "$so_pin" "$log"; then
    kb_die "a PIN appears in the test log of the $run run"
  fi
  kb_log "suite passed on $run; no PIN in its log"
}

# Each test's databases (kb_test_*, tests/it/common.rs: fresh_database) are dropped as its test
# process ends, by a dropper that starts then: this waits for the last ones (with a deadline, as
# the tests do) and fails the run if any database is left, with what the droppers printed.
check_test_databases() {
  local run=$1 left deadline=$((SECONDS + 60))
  while :; do
    left=$(psql -X "$DATABASE_URL" -tAc \
      "SELECT string_agg(datname, ' ') FROM pg_database WHERE datname LIKE 'kb\_test\_%'") ||
      kb_die "cannot list the databases left after the $run run"
    [ -n "$left" ] || break
    if [ "$SECONDS" -ge "$deadline" ]; then
      cat "$WORK/dropped-databases.log" >&2 2>/dev/null || true
      kb_die "test databases left after the $run run: $left"
    fi
    sleep 0.2
  done
  kb_log "no test database left after the $run run"
}

for run in $TOKENS; do
  case "$run" in
    kryoptic*)
      if [ -n "$KRYOPTIC_BUILD" ]; then
        wait_for_build "$KRYOPTIC_BUILD" "$WORK/kryoptic-build.log" Kryoptic
        KRYOPTIC_BUILD=
      fi
      kb_build_kryoptic   # built: only sets KB_KRYOPTIC_MODULE
      ;;
  esac
  run_suite "$run"
done
kb_log "all runs passed: $TOKENS"

# The served OpenAPI document as a contract: schemathesis against a broker on SoftHSM2 (the
# HTTP contract does not depend on the token). Skipped when a filter picks some tests only.
[ "$WHOLE" != whole ] || ./scripts/contract.sh
# The client libraries (clients/*), their own tests and their envelopes crossed, against a broker
# on SoftHSM2 (what they test is HTTP and local crypto, not the token).
[ "$WHOLE" != whole ] || ./scripts/clients-test.sh
# The officer's console in Debian's chromium (Playwright), on SoftHSM2 only: the console is HTTP
# and the same handlers as the API, which the suite runs on both tokens.
[ "$WHOLE" != whole ] || ./scripts/console-test.sh
if [ -n "$FUZZ_BUILD" ]; then
  wait_for_build "$FUZZ_BUILD" "$WORK/fuzz-build.log" "the fuzz targets"
  ./scripts/fuzz.sh 30   # every fuzz target for 30 s (not on a filtered run)
fi
