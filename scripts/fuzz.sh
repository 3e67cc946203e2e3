#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer, AddressSanitizer, debug assertions and
# overflow checks) of everything keybroker parses from untrusted bytes: one target each in
# tests/fuzz/fuzz_targets. Builds every target once, then runs each for SECONDS, JOBS at a time,
# starting from the committed seeds (tests/fuzz/seeds/<target>) and the corpus earlier runs grew
# (tests/fuzz/corpus/<target>, git-ignored). Prints per target the executions, executions/s,
# corpus and result, then a total line; exits non-zero if any target crashed (the input is in
# tests/fuzz/artifacts/<target>/; replay it with `cargo +nightly fuzz run --fuzz-dir tests/fuzz
# <target> <file>`).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 30 s, every target)
#   KB_FUZZ_JOBS     targets run at a time (default 2, one per core of the CI machine)
#   KB_FUZZ_FLAGS    extra libFuzzer flags, e.g. "-max_len=8192"
#   KB_FUZZ_BUILD_ONLY=1  build the targets and stop (test.sh builds them in the background)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

SECS=${1:-30}
shift || true
JOBS=${KB_FUZZ_JOBS:-2}
FUZZ_DIR=tests/fuzz
TARGET_DIR=target/fuzz
case "$SECS" in '' | *[!0-9]*) kb_die "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" ;; esac

rustup run nightly rustc --version >/dev/null 2>&1 ||
  kb_die "cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly"
if ! cargo fuzz --version >/dev/null 2>&1; then
  kb_log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

ALL=$(cargo +nightly fuzz list --fuzz-dir "$FUZZ_DIR")
TARGETS=${*:-$ALL}
for t in $TARGETS; do
  grep -qx "$t" <<<"$ALL" || kb_die "no fuzz target '$t' (there are: $(echo $ALL))"
done

kb_log "building the fuzz targets (nightly, release + debug assertions, AddressSanitizer)"
start=$(date +%s)
cargo +nightly fuzz build --fuzz-dir "$FUZZ_DIR" --target-dir "$TARGET_DIR" >&2
kb_log "built in $(($(date +%s) - start)) s"
[ -z "${KB_FUZZ_BUILD_ONLY:-}" ] || exit 0
BIN_DIR="$TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"

LOGS="$TARGET_DIR/logs"
mkdir -p "$LOGS"
# One target: its binary straight (no cargo in the timed part), new inputs into its corpus.
run_target() {
  local t=$1
  mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
  local status=0
  # shellcheck disable=SC2086 # KB_FUZZ_FLAGS is a list of flags
  "$BIN_DIR/$t" -max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$FUZZ_DIR/artifacts/$t/" ${KB_FUZZ_FLAGS:-} \
    "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/seeds/$t" >"$LOGS/$t.log" 2>&1 || status=$?
  echo "$status" >"$LOGS/$t.rc"
}

kb_log "fuzzing $(wc -w <<<"$TARGETS") target(s) for $SECS s each, $JOBS at a time (logs: $LOGS)"
start=$(date +%s)
running=0
for t in $TARGETS; do
  rm -f "$LOGS/$t.rc"
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  running=$((running + 1))
done
wait || true
wall=$(($(date +%s) - start))

total=0 crashed=0
printf '%-18s %14s %10s %16s  %s\n' target executions exec/s corpus result
for t in $TARGETS; do
  log="$LOGS/$t.log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  corpus=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2)
  rc=$(cat "$LOGS/$t.rc" 2>/dev/null || echo missing)
  if [ "$rc" = 0 ]; then
    result=ok
  else
    crashed=$((crashed + 1))
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    result="CRASHED (exit $rc${artifact:+, input $artifact}; log $log)"
  fi
  total=$((total + ${execs:-0}))
  printf '%-18s %14s %10s %16s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${corpus:-?}" "$result"
done
printf 'total: %s executions in %s s wall time, %s crashed\n' "$total" "$wall" "$crashed"
[ "$crashed" -eq 0 ] || kb_die "$crashed fuzz target(s) crashed"
