#!/usr/bin/env bash
# Benchmark: (a) the raw token rate of the seal the broker uses, through the HSM layer with no
# HTTP, (b) HTTPS `/healthz` (the floor), then datakey and unwrap requests/s with p50/p99 latency
# at 1, 16 and 64 keep-alive connections (wrk), each as a ratio to `/healthz` at the same
# connections in the same run, a garbage-token flood (its rate and the audit rows it added), and
# the broker's RSS after 100,000 and 1,000,000 data keys, and (c) the HSM layer on a network HSM:
# SoftHSM2 behind the fault module with 2 ms on every PKCS#11 call, seals/s with 1, 4, 16 and
# 32 pool sessions. Everything runs on this machine, in throwaway locations, against a release
# build.
#
#   BENCH_SECONDS   seconds per measurement (default 10)
#   BENCH_PARTS     "all" (default), "pool" for (c) alone, "http" for (b) alone
#   BENCH_RSS_REQUESTS  data keys for the RSS figure (default 1000000; 0 skips it)
#   BENCH_PROFILE   1 (default): a perf profile while datakey runs at 64 connections; 0 skips it
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KB_ROOT"

SECONDS_EACH=${BENCH_SECONDS:-10}
PARTS=" ${BENCH_PARTS:-all} "
kb_install_deps wrk curl

WORK=$(mktemp -d /tmp/keybroker-bench.XXXXXX)
chmod 755 "$WORK"
cleanup() {
  [ -n "${KB_SERVER_PID:-}" ] && kill -TERM "$KB_SERVER_PID" 2>/dev/null && wait "$KB_SERVER_PID" 2>/dev/null
  kb_stop_postgres "$WORK/pg"
  rm -rf "$WORK"
}
trap cleanup EXIT

kb_log "building keybroker and the fault module (release)"
cargo build --release --quiet
cargo build --release --quiet -p pkcs11-faults
BIN="$KB_ROOT/target/release/keybroker"
FAULTS="$KB_ROOT/target/release/libkb_pkcs11_faults.so"

kb_setup_throwaway_broker "$BIN" "$WORK" keybroker-bench

# (c) a network HSM: every PKCS#11 call costs 2 ms (the fault module sleeps before forwarding),
# as a token across a LAN does. One caller per pool session; the seal is what `datakey` asks:
# random DEK, then AES-GCM (with its IV), so five calls of 2 ms at least.
if [[ $PARTS == *" pool "* || $PARTS == *" all "* ]]; then
  kb_log "seal rate with 2 ms per token call, by pool size, ${SECONDS_EACH}s per run"
  printf 'latency_ms = 2\n' >"$WORK/network-hsm.conf"
  declare -A POOL_RATE
  POOL_ROWS=()
  for pool in 1 4 16 32; do
    line=$(PKCS11_MODULE="$FAULTS" KB_FAULTS_MODULE="$KB_SOFTHSM_MODULE" \
      KB_FAULTS_CONTROL="$WORK/network-hsm.conf" KEYBROKER_HSM_POOL_SIZE=$pool \
      "$BIN" bench --seconds "$SECONDS_EACH" --concurrency "$pool" 2>"$WORK/bench.err") \
      || { cat "$WORK/bench.err" >&2; exit 1; }
    POOL_RATE[$pool]=$(sed -n 's/.*ops_per_s=\([0-9]*\).*/\1/p' <<<"$line")
    p50=$(sed -n 's/.*p50_us=\([0-9.]*\).*/\1/p' <<<"$line")
    p99=$(sed -n 's/.*p99_us=\([0-9.]*\).*/\1/p' <<<"$line")
    speedup=$(awk -v r="${POOL_RATE[$pool]}" -v one="${POOL_RATE[1]}" 'BEGIN {printf "%.1f", r / one}')
    POOL_ROWS+=("$(printf '| %4s | %8s | %8.1f | %8.1f | %6s× |' "$pool" "${POOL_RATE[$pool]}" \
      "$(awk -v u="$p50" 'BEGIN {print u / 1000}')" "$(awk -v u="$p99" 'BEGIN {print u / 1000}')" "$speedup")")
    kb_log "pool $pool: ${POOL_RATE[$pool]} seals/s (${speedup}× one session)"
  done
  echo
  echo "network HSM (2 ms per PKCS#11 call), one HSM-layer call per seal, one caller per session:"
  echo "| pool | seals/s | p50 (ms) | p99 (ms) | vs pool 1 |"
  echo "|------|---------|----------|----------|-----------|"
  printf '%s\n' "${POOL_ROWS[@]}"
  echo
fi
[[ $PARTS == *" all "* || $PARTS == *" http "* ]] || exit 0

# (a) the token alone: inside one blocking call (the token's own rate), then one HSM-layer
# call per seal from 1, 2 and 16 tasks. The best layer rate is the (a) of the ratio.
kb_log "token seal rate, ${SECONDS_EACH}s per run"
declare -A TOKEN_RATE
BEST=0
[[ $PARTS == *" all "* ]] && for c in 0 1 2 16; do
  line=$("$BIN" bench --seconds "$SECONDS_EACH" --concurrency "$c" 2>"$WORK/bench.err") \
    || { cat "$WORK/bench.err" >&2; exit 1; }
  echo "  $line"
  TOKEN_RATE[$c]=$(sed -n 's/.*ops_per_s=\([0-9]*\).*/\1/p' <<<"$line")
  if [ "$c" -gt 0 ] && [ "${TOKEN_RATE[$c]}" -gt "$BEST" ]; then BEST=${TOKEN_RATE[$c]}; fi
done

# (b) the server over HTTPS, every rate next to the server's own floor in the same run: `/healthz`
# (no authentication, no token, no database) at the same number of connections.
FLOOD_WINDOW=10
KEYBROKER_REFUSAL_AUDIT_SECS=$FLOOD_WINDOW RUST_LOG=warn kb_serve_background "$BIN" "$WORK"
SERVER=$KB_SERVER_PID URL=$KB_URL

# One token for the whole run: the default lifetime (5 min) outlasts the measurements.
TOKEN=$(kb_access_token "$WORK/admin.json" "$URL" "$WORK/tls/ca.pem")
# The token goes to curl and wrk through private files ($WORK is world-readable for Postgres'
# sake), never on a command line.
umask 077
printf 'authorization: Bearer %s\n' "$TOKEN" >"$WORK/auth.header"
# The benchmark measures the broker, not its rate limits: lifted for this throwaway instance.
kb_lift_rate_limits "$URL" "$WORK/tls/ca.pem" "$WORK/auth.header"
CONTEXT='{"tenant":"bench","purpose":"datakey"}'
BLOB=$(curl -sf --cacert "$WORK/tls/ca.pem" -H 'content-type: application/json' -H @"$WORK/auth.header" \
  -d "{\"context\":$CONTEXT,\"plaintext\":false}" "$URL/v1/datakey" | sed 's/.*"wrapped":"\([^"]*\)".*/\1/')
cat >"$WORK/datakey.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.body = '{"context":$CONTEXT}'
LUA
cat >"$WORK/unwrap.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.body = '{"wrapped":"$BLOB","context":$CONTEXT}'
LUA
# A flood of bearer tokens that are not even JWTs, each refused before authentication.
cat >"$WORK/flood.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer garbage.not-a.jwt"
wrk.body = '{}'
LUA
: >"$WORK/healthz.lua"

# wrk prints latency in us/ms/s; normalise to milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.2f", n }'
}

# measure SCRIPT PATH CONNS SECONDS: sets RPS, P50, P99, NON2XX, TOTAL.
measure() {
  local threads=$(( $3 < 2 ? 1 : 2 )) out
  out=$(wrk -t"$threads" -c"$3" -d"${4}s" --latency -s "$WORK/$1.lua" "$URL$2")
  RPS=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
  P50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  P99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $5}' <<<"$out")
  NON2XX=${NON2XX:-0}
  TOTAL=$(awk '/ requests in / {print $1}' <<<"$out")
}
ratio() { awk -v r="$1" -v f="$2" 'BEGIN {printf "%.2f", (f > 0 ? r / f : 0)}'; }
audit_rows() { psql "$DATABASE_URL" -tAc 'SELECT count(*) FROM audit_events'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER/status"; }

declare -A FLOOR
ROWS=()
for c in 1 16 64; do
  measure healthz /healthz "$c" "$SECONDS_EACH"
  FLOOR[$c]=$RPS
  ROWS+=("$(printf '| %-7s | %5s | %8s | %8s | %8s | %5s | %7s |' healthz "$c" "$RPS" "$P50" "$P99" 1.00 "$NON2XX")")
  kb_log "healthz c=$c: $RPS req/s, p50 ${P50} ms, p99 ${P99} ms"
done
for endpoint in datakey unwrap; do
  for c in 1 16 64; do
    measure "$endpoint" "/v1/$endpoint" "$c" "$SECONDS_EACH"
    r=$(ratio "$RPS" "${FLOOR[$c]}")
    ROWS+=("$(printf '| %-7s | %5s | %8s | %8s | %8s | %5s | %7s |' "$endpoint" "$c" "$RPS" "$P50" "$P99" "$r" "$NON2XX")")
    kb_log "$endpoint c=$c: $RPS req/s (${r}× healthz), p50 ${P50} ms, p99 ${P99} ms"
  done
done

# The garbage-token flood: 64 connections for 10 s from one source. Its refusals are audited as
# one coalesced `auth.refused` event per source per window ($FLOOD_WINDOW s here): the rows it
# added are counted once two windows have passed after it.
before=$(audit_rows)
flood_started=$(date +%s)
measure flood /v1/datakey 64 10
FLOOD_RPS=$RPS FLOOD_TOTAL=$TOTAL FLOOD_REFUSED=$NON2XX FLOOD_P99=$P99
sleep $(( 2 * FLOOD_WINDOW + 1 ))
added=$(( $(audit_rows) - before ))
windows=$(( ( $(date +%s) - flood_started + FLOOD_WINDOW - 1 ) / FLOOD_WINDOW ))
kb_log "flood: $FLOOD_RPS req/s ($FLOOD_REFUSED of $FLOOD_TOTAL refused), $added audit rows in $windows windows"

# Memory: the broker's RSS after the first 100,000 data keys and after 1,000,000
# (BENCH_RSS_REQUESTS; 0 skips it), driven at 64 connections in chunks of 5 s.
RSS_TARGET=${BENCH_RSS_REQUESTS:-1000000}
RSS_LINE="RSS: skipped (BENCH_RSS_REQUESTS=0)"
if [ "$RSS_TARGET" -gt 0 ]; then
  done_keys=0 rss_early= early_at=$(( RSS_TARGET / 10 ))
  while [ "$done_keys" -lt "$RSS_TARGET" ]; do
    measure datakey /v1/datakey 64 5
    done_keys=$(( done_keys + TOTAL - NON2XX ))
    if [ -z "$rss_early" ] && [ "$done_keys" -ge "$early_at" ]; then
      rss_early=$(rss_kib) early_keys=$done_keys
    fi
  done
  rss_late=$(rss_kib)
  growth=$(awk -v a="$rss_early" -v b="$rss_late" 'BEGIN {printf "%+.1f", (b - a) * 100 / a}')
  RSS_LINE="RSS: ${rss_early} KiB after $early_keys data keys, ${rss_late} KiB after $done_keys (${growth} %)"
  kb_log "$RSS_LINE"
fi

# Where the time goes: a sampling profile (perf, software clock: this VM has no hardware
# counters) of the whole machine while datakey runs at 64 connections (BENCH_PROFILE=0 skips it).
PROFILE_LINE=
if [ "${BENCH_PROFILE:-1}" != 0 ]; then
  kb_install_packages linux-perf
  perf record -q -e cpu-clock -F 999 -g -a -o "$WORK/perf.data" -- sleep "$SECONDS_EACH" >/dev/null 2>&1 &
  PERF=$!
  measure datakey /v1/datakey 64 "$SECONDS_EACH"
  wait "$PERF" || true
  # (awk, not head: head would close the pipe on perf, and pipefail would stop the script)
  perf report -i "$WORK/perf.data" --stdio --no-children --sort comm,dso -q 2>/dev/null \
    | awk 'NF && $1 ~ /%$/ && n++ < 15' >"$WORK/profile-dso.txt"
  perf report -i "$WORK/perf.data" --stdio --no-children --sort sym -g none -q 2>/dev/null \
    | awk 'NF && $1 ~ /%$/ && n++ < 40' >"$WORK/profile-sym.txt"
  PROFILE_LINE=yes
fi

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(. /etc/os-release; echo "$PRETTY_NAME"), $(softhsm2-util --version | head -1 | sed 's/^/SoftHSM /')"
if [ "$BEST" -gt 0 ]; then
  echo "token seal (RNG 32 B + AES-256-GCM), no HTTP: ${TOKEN_RATE[0]} ops/s inside one blocking call;"
  echo "through the HSM layer, one call per seal: ${TOKEN_RATE[1]} / ${TOKEN_RATE[2]} / ${TOKEN_RATE[16]} ops/s with 1 / 2 / 16 callers"
fi
echo
echo "| op      | conns |    req/s | p50 (ms) | p99 (ms) | ×healthz | non-2xx |"
echo "|---------|-------|----------|----------|----------|----------|---------|"
printf '%s\n' "${ROWS[@]}"
echo
echo "garbage-token flood, 64 connections, 10 s: $FLOOD_RPS req/s ($(ratio "$FLOOD_RPS" "${FLOOR[64]}")× healthz), p99 $FLOOD_P99 ms, $FLOOD_REFUSED of $FLOOD_TOTAL refused; audit rows added: $added over $windows windows of ${FLOOD_WINDOW} s (one source)"
echo "$RSS_LINE"
if [ -n "$PROFILE_LINE" ]; then
  echo
  echo "profile of the machine during datakey at 64 connections (perf, cpu-clock), by process and object:"
  cat "$WORK/profile-dso.txt"
  echo
  echo "hottest symbols:"
  cat "$WORK/profile-sym.txt"
fi
