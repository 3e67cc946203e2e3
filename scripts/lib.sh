# Shared set-up steps for run.sh, test.sh and bench.sh. Source it; do not run it.
# Every function is idempotent: it reuses what exists and creates what is missing.

KB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KB_PG_BIN=${KB_PG_BIN:-/usr/lib/postgresql/15/bin}
KB_SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
# The second PKCS#11 implementation the suite runs on: Kryoptic, built from crates.io (it ships
# no binary) and cached here, so only the first run builds it.
KB_KRYOPTIC_VERSION=1.5.4
KB_CACHE_DIR=${KB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker}

kb_log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
kb_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs softhsm2, opensc and the Postgres 15 server when missing (apt-get, as root), or says
# exactly what to install.
kb_install_deps() {
  local missing=()
  command -v softhsm2-util >/dev/null 2>&1 && [ -f "$KB_SOFTHSM_MODULE" ] || missing+=(softhsm2)
  command -v pkcs11-tool >/dev/null 2>&1 || missing+=(opensc)
  [ -x "$KB_PG_BIN/initdb" ] && [ -x "$KB_PG_BIN/pg_ctl" ] || missing+=(postgresql-15)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client-15)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  for extra in "$@"; do command -v "$extra" >/dev/null 2>&1 || missing+=("$extra"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    kb_die "missing packages: ${missing[*]}. Install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}"
  fi
  kb_log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Installs the Debian packages named that are not installed yet (as root), or says which.
kb_install_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    kb_die "missing packages: ${missing[*]}. Install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}"
  fi
  kb_log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A TCP port nobody listens on, from a random start so parallel runs rarely collide.
# Below the kernel's ephemeral range, where outgoing connections take their local ports: a port
# one of them holds cannot be listened on, and no connect() test shows it (a load test holds
# thousands).
kb_free_port() {
  local low=10000 high port
  high=$(awk '{print $1 - 1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32767)
  [ "$high" -gt $((low + 1000)) ] || high=32767
  port=$(( low + RANDOM % (high - low) ))
  while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$(( port + 1 )); done
  echo "$port"
}

# A random PIN/secret of 24 characters, written to FILE (mode 600) unless FILE exists.
kb_secret_file() {
  local file=$1
  [ -s "$file" ] && return 0
  (umask 077; mkdir -p "$(dirname "$file")"; head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$file")
}

# SoftHSM2 config and token folder under DIR; exports SOFTHSM2_CONF and PKCS11_MODULE.
kb_setup_softhsm() {
  local dir=$1
  mkdir -p "$dir/tokens"
  chmod 700 "$dir"
  sed "s|@TOKENDIR@|$dir/tokens|" "$KB_ROOT/softhsm/softhsm2.conf.in" >"$dir/softhsm2.conf"
  export SOFTHSM2_CONF="$dir/softhsm2.conf"
  export PKCS11_MODULE="$KB_SOFTHSM_MODULE"
}

# What building Kryoptic needs from Debian (test.sh installs them up front, so that the build
# can run in the background without a second apt beside another).
KB_KRYOPTIC_BUILD_PACKAGES="libssl-dev pkg-config libsqlite3-dev libclang-dev"
# Kryoptic's PKCS#11 module (libkryoptic_pkcs11.so), built once with the system OpenSSL (Debian
# 12's 3.0 is too old for its default features) and kept in KB_CACHE_DIR; exports
# KB_KRYOPTIC_MODULE.
kb_build_kryoptic() {
  local dest="$KB_CACHE_DIR/kryoptic-$KB_KRYOPTIC_VERSION"
  export KB_KRYOPTIC_MODULE="$dest/libkryoptic_pkcs11.so"
  [ -f "$KB_KRYOPTIC_MODULE" ] && return 0
  kb_install_packages $KB_KRYOPTIC_BUILD_PACKAGES
  kb_log "building Kryoptic $KB_KRYOPTIC_VERSION (once; cached in $dest)"
  local build
  build=$(mktemp -d /tmp/kryoptic-build.XXXXXX)
  # Cargo fetches the published crate (with its Cargo.lock) through a throwaway manifest.
  mkdir -p "$build/fetch/src"
  touch "$build/fetch/src/lib.rs"
  printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nkryoptic = { version = "=%s", default-features = false }\n' \
    "$KB_KRYOPTIC_VERSION" >"$build/fetch/Cargo.toml"
  local source
  source=$(cd "$build/fetch" && cargo metadata --format-version 1 | python3 -c '
import json, sys
meta = json.load(sys.stdin)
print(next(p["manifest_path"] for p in meta["packages"] if p["name"] == "kryoptic").rsplit("/", 1)[0])')
  cp -r "$source" "$build/kryoptic"
  (cd "$build/kryoptic" && cargo build --release --locked --quiet \
    --no-default-features --features minimal,kryoptic-lib/dynamic --target-dir "$build/target")
  mkdir -p "$dest"
  cp "$build/target/release/libkryoptic_pkcs11.so" "$KB_KRYOPTIC_MODULE.tmp"
  mv "$KB_KRYOPTIC_MODULE.tmp" "$KB_KRYOPTIC_MODULE"
  rm -rf "$build"
}

# A Kryoptic token store (SQLite) and its config under DIR; exports KRYOPTIC_CONF and
# PKCS11_MODULE (after kb_build_kryoptic).
kb_setup_kryoptic() {
  local dir=$1
  mkdir -p "$dir"
  chmod 700 "$dir"
  sed "s|@TOKENDB@|$dir/token.sqlite|" "$KB_ROOT/softhsm/kryoptic.conf.in" >"$dir/kryoptic.conf"
  export KRYOPTIC_CONF="$dir/kryoptic.conf"
  export PKCS11_MODULE="$KB_KRYOPTIC_MODULE"
}

# Whether the module in PKCS11_MODULE shows a token labelled LABEL.
kb_has_token() {
  pkcs11-tool --module "$PKCS11_MODULE" --list-token-slots 2>/dev/null \
    | grep -Eq "^[[:space:]]*token label[[:space:]]*:[[:space:]]*$1[[:space:]]*$"
}

# Runs a command as the unprivileged owner of the Postgres cluster (initdb refuses root).
kb_pg_run() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A Postgres 15 cluster in DIR (socket in DIR too), started on a free port (kept in DIR/port),
# with database DB. Exports DATABASE_URL and KB_PG_DIR. KB_PG_SETTINGS, if set, holds more
# server settings (`name=value` words) for a cluster this call starts.
kb_setup_postgres() {
  local dir=$1 db=$2
  export KB_PG_DIR=$dir
  if [ ! -f "$dir/PG_VERSION" ]; then
    kb_log "creating a Postgres cluster in $dir"
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    chmod 700 "$dir"
    kb_pg_run "$KB_PG_BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  local port
  if kb_pg_run "$KB_PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    port=$(cat "$dir/port")
  else
    # A port free when picked can be taken before Postgres binds it (another run's server):
    # then another port, a few times.
    local tries=0
    until port=$(kb_free_port) && kb_pg_run sh -c "echo $port >'$dir/port'" &&
      kb_pg_run "$KB_PG_BIN/pg_ctl" -D "$dir" -w -l "$dir/server.log" \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1${KB_PG_SETTINGS:+ -c ${KB_PG_SETTINGS// / -c }}" start >/dev/null; do
      tries=$((tries + 1))
      if [ "$tries" -ge 5 ] || ! tail -n 5 "$dir/server.log" | grep -q "Address already in use"; then
        kb_die "Postgres did not start in $dir; its log: $dir/server.log"
      fi
      kb_log "port $port was taken before Postgres bound it; another"
    done
  fi
  if ! psql -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE $db" >/dev/null
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/$db"
}

kb_stop_postgres() {
  local dir=${1:-${KB_PG_DIR:-}}
  [ -n "$dir" ] && [ -f "$dir/postmaster.pid" ] || return 0
  kb_pg_run "$KB_PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
}

# Token LABEL initialised (the soft tokens these scripts set up only: a vendor's token is
# initialised with its own tools), then keybroker's keys created and recorded by `keybroker hsm
# init` (further arguments go to it). PINs come from KEYBROKER_SO_PIN(_FILE) and
# KEYBROKER_PIN(_FILE).
kb_init_token() {
  local bin=$1 label=$2
  shift 2
  export KEYBROKER_TOKEN_LABEL=$label
  export PKCS11_MODULE=${PKCS11_MODULE:-$KB_SOFTHSM_MODULE}
  case "$PKCS11_MODULE" in
    "$KB_SOFTHSM_MODULE" | "${KB_KRYOPTIC_MODULE:-/nonexistent}")
      if ! kb_has_token "$label"; then
        kb_log "initialising token '$label' on $(basename "$PKCS11_MODULE")"
        "$bin" hsm init-token
      fi
      ;;
  esac
  "$bin" hsm init "$@"
}

# The access token of the client whose credentials JSON (client_id, client_secret, as
# `hsm init --admin-credentials-out` writes it) is in FILE, from the broker at URL.
kb_access_token() {
  local file=$1 url=$2 ca=$3 id secret
  id=$(sed -n 's/.*"client_id": *"\([^"]*\)".*/\1/p' "$file")
  secret=$(sed -n 's/.*"client_secret": *"\([^"]*\)".*/\1/p' "$file")
  # The credentials go to curl on stdin (-K -), not on its command line, where `ps` shows them.
  printf 'user = "%s:%s"\n' "$id" "$secret" \
    | curl -sf --cacert "$ca" -K - -d grant_type=client_credentials "$url/v1/oauth/token" \
    | sed 's/.*"access_token":"\([^"]*\)".*/\1/'
}

# A throwaway broker set-up in DIR for measurements (scripts/bench.sh, scripts/soak.sh): a
# SoftHSM2 token labelled LABEL with keybroker's keys, a Postgres cluster, the bootstrap admin's
# credentials in DIR/admin.json and a dev certificate in DIR/tls. BIN is the keybroker binary.
kb_setup_throwaway_broker() {
  local bin=$1 dir=$2 label=$3
  kb_setup_softhsm "$dir/softhsm"
  kb_secret_file "$dir/secrets/so.pin"
  kb_secret_file "$dir/secrets/user.pin"
  export KEYBROKER_SO_PIN_FILE="$dir/secrets/so.pin" KEYBROKER_PIN_FILE="$dir/secrets/user.pin"
  kb_setup_postgres "$dir/pg" keybroker
  kb_init_token "$bin" "$label" --admin-credentials-out "$dir/admin.json" >/dev/null
  "$bin" dev-cert --dir "$dir/tls" >/dev/null
}

# `BIN serve` in the background on a free port with the certificate of DIR/tls, its log in
# DIR/server.log, once it is ready: sets KB_SERVER_PID and KB_URL. More settings for the server
# go in the environment of the call (e.g. `RUST_LOG=warn kb_serve_background ...`).
kb_serve_background() {
  local bin=$1 dir=$2 port attempt
  for attempt in 1 2 3; do
    port=$(kb_free_port)
    KEYBROKER_TLS_CERT="$dir/tls/server.pem" KEYBROKER_TLS_KEY="$dir/tls/server-key.pem" \
      KEYBROKER_LISTEN="127.0.0.1:$port" "$bin" serve 2>"$dir/server.log" &
    KB_SERVER_PID=$!
    KB_URL="https://127.0.0.1:$port"
    for _ in $(seq 100); do
      curl -sf --cacert "$dir/tls/ca.pem" "$KB_URL/readyz" >/dev/null && return 0
      # Exited: the port was taken before it bound it (then another port), or a real failure.
      kill -0 "$KB_SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$KB_SERVER_PID" 2>/dev/null || ! grep -q "Address already in use" "$dir/server.log" || continue
    break
  done
  kb_die "the broker did not get ready; its log: $dir/server.log"
}

# A throwaway folder WORK for one script's token, Postgres cluster and broker, emptied when the
# script exits: the broker in KB_SERVER_PID stopped, the cluster stopped, the folder removed
# (kept with KB_KEEP_TEST_DIR=1). NAME goes into the folder's name.
kb_throwaway_work() {
  WORK=$(mktemp -d "/tmp/keybroker-$1.XXXXXX")
  chmod 755 "$WORK"   # the unprivileged Postgres user must reach $WORK/pg
  KB_SERVER_PID=
  trap kb_throwaway_cleanup EXIT
}
kb_throwaway_cleanup() {
  set +e
  [ -n "${KB_SERVER_PID:-}" ] && kill -TERM "$KB_SERVER_PID" 2>/dev/null && wait "$KB_SERVER_PID" 2>/dev/null
  kb_stop_postgres "$WORK/pg"
  [ -n "${KB_KEEP_TEST_DIR:-}" ] || rm -rf "$WORK"
}

# Lifts the rate limits and the anomaly check of the broker at URL (for measuring the broker,
# not its limits; the defaults would turn most of a load into 429s), as the client whose
# `authorization:` header line is in HEADER_FILE.
kb_lift_rate_limits() {
  local url=$1 ca=$2 header=$3
  curl -sf --cacert "$ca" -X PUT -H 'content-type: application/json' \
    -H @"$header" "$url/v1/admin/security-settings" \
    -d '{"per_ip_per_second": 1000000, "per_ip_burst": 1000000, "per_client_per_second": 1000000,
         "per_client_burst": 1000000, "block_after_violations": 1000000, "anomaly_refusals": 0}' >/dev/null
}
