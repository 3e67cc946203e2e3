#!/usr/bin/env bash
# Soak: a release broker set up as scripts/bench.sh sets one up (a throwaway SoftHSM2 token,
# Postgres and dev certificate), the peak rate of a mixed load measured, then that mix held at
# 80 % of the peak for DURATION. The load is examples/soak_load.rs: in every 20 requests, 8 data
# keys, 8 unwraps, 2 reads of a managed key's material (the token decrypts it), a secret read and
# a secret write; the peak with 64 keep-alive connections, the soak open-loop at a fixed rate.
# Reports requests by status, errors (non-2xx), the achieved rate, latency p50/p99 (from each
# request's due time), and the broker's RSS before the peak, at the start and at the end.
#
#   scripts/soak.sh [DURATION]   a number of seconds, or with s, m or h (default 10m)
#   SOAK_PEAK_SECONDS            length of the peak measurement (default 20)
#   SOAK_PERCENT                 share of the peak to hold (default 80)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

DURATION=${1:-10m}
case "$DURATION" in
  *[0-9]h) SECS=$(( ${DURATION%h} * 3600 )) ;;
  *[0-9]m) SECS=$(( ${DURATION%m} * 60 )) ;;
  *[0-9]s) SECS=$(( ${DURATION%s} )) ;;
  *[!0-9]* | '') kb_die "DURATION is seconds, or a number ending in s, m or h: '$DURATION'" ;;
  *) SECS=$DURATION ;;
esac
PEAK_SECS=${SOAK_PEAK_SECONDS:-20}
PERCENT=${SOAK_PERCENT:-80}
kb_install_deps curl

WORK=$(mktemp -d /tmp/keybroker-soak.XXXXXX)
chmod 755 "$WORK"   # the unprivileged Postgres user must reach $WORK/pg
cleanup() {
  [ -n "${KB_SERVER_PID:-}" ] && kill -TERM "$KB_SERVER_PID" 2>/dev/null && wait "$KB_SERVER_PID" 2>/dev/null
  kb_stop_postgres "$WORK/pg"
  rm -rf "$WORK"
}
trap cleanup EXIT

kb_log "building keybroker and the load generator (release)"
cargo build --release --quiet --bin keybroker --example soak_load
BIN="$KB_ROOT/target/release/keybroker"
LOAD="$KB_ROOT/target/release/examples/soak_load"

kb_setup_throwaway_broker "$BIN" "$WORK" keybroker-soak
# One access token for the whole run, so it must outlive it.
KEYBROKER_TOKEN_TTL_SECS=$(( SECS + 3600 )) RUST_LOG=warn kb_serve_background "$BIN" "$WORK"
umask 077   # the token goes to the load generator and curl through private files only
TOKEN=$(kb_access_token "$WORK/admin.json" "$KB_URL" "$WORK/tls/ca.pem")
printf '%s\n' "$TOKEN" >"$WORK/bearer"
printf 'authorization: Bearer %s\n' "$TOKEN" >"$WORK/auth.header"
kb_lift_rate_limits "$KB_URL" "$WORK/tls/ca.pem" "$WORK/auth.header"
export KB_URL KB_CA="$WORK/tls/ca.pem" KB_BEARER_FILE="$WORK/bearer"
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$KB_SERVER_PID/status"; }
field() { sed -n "1s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2"; }

RSS_FRESH=$(rss_kib)
kb_log "peak rate of the mix: ${PEAK_SECS}s at 64 connections"
PEAK_OUT=$("$LOAD" peak "$PEAK_SECS")
sed 's/^/  /' <<<"$PEAK_OUT"
PEAK=$(field achieved_rps "$PEAK_OUT")
TARGET=$(( PEAK * PERCENT / 100 ))
[ "$TARGET" -gt 0 ] || kb_die "no peak measured"

RSS_START=$(rss_kib)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
kb_log "holding $TARGET req/s ($PERCENT % of $PEAK) for ${SECS}s"
SOAK_OUT=$("$LOAD" rate "$TARGET" "$SECS")
RSS_END=$(rss_kib)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
sed 's/^/  /' <<<"$SOAK_OUT"
READY=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$KB_CA" "$KB_URL/readyz")

echo
echo "machine: $(nproc) cores, load average $LOAD_START at the start, $LOAD_END at the end"
echo "peak of the mix: $PEAK req/s (64 connections, ${PEAK_SECS}s, $(field errors "$PEAK_OUT") errors)"
echo "soak: $TARGET req/s target ($PERCENT %) for ${SECS}s: achieved $(field achieved_rps "$SOAK_OUT") req/s," \
  "$(field requests "$SOAK_OUT") requests, $(field errors "$SOAK_OUT") errors," \
  "p50 $(field p50_ms "$SOAK_OUT") ms, p99 $(field p99_ms "$SOAK_OUT") ms"
echo "broker RSS: $RSS_FRESH KiB fresh, $RSS_START KiB at the start of the soak, $RSS_END KiB at the end" \
  "($(awk -v a="$RSS_START" -v b="$RSS_END" 'BEGIN {printf "%+.1f", (b - a) * 100 / a}') %); /readyz after it: $READY"
