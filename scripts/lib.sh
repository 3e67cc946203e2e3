# Shared set-up steps for run.sh, test.sh and bench.sh. Source it; do not run it.
# Every function is idempotent: it reuses what exists and creates what is missing.

KB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KB_PG_BIN=${KB_PG_BIN:-/usr/lib/postgresql/15/bin}
KB_SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so

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

# A TCP port nobody listens on, from a random start so parallel runs rarely collide.
kb_free_port() {
  local port=$(( 20000 + RANDOM % 20000 ))
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

# Whether a SoftHSM2 token labelled LABEL exists under SOFTHSM2_CONF.
kb_softhsm_has_token() {
  softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$1[[:space:]]*$"
}

# Runs a command as the unprivileged owner of the Postgres cluster (initdb refuses root).
kb_pg_run() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A Postgres 15 cluster in DIR (socket in DIR too), started on a free port (kept in DIR/port),
# with database DB. Exports DATABASE_URL and KB_PG_DIR.
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
    port=$(kb_free_port)
    kb_pg_run sh -c "echo $port >'$dir/port'"
    kb_pg_run "$KB_PG_BIN/pg_ctl" -D "$dir" -w -l "$dir/server.log" \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
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

# Token LABEL initialised (SoftHSM2 only: another vendor's token is initialised with its own
# tools), then keybroker's keys created and recorded by `keybroker hsm init` (further arguments
# go to it). PINs come from KEYBROKER_SO_PIN(_FILE) and KEYBROKER_PIN(_FILE).
kb_init_token() {
  local bin=$1 label=$2
  shift 2
  export KEYBROKER_TOKEN_LABEL=$label
  if [ "${PKCS11_MODULE:-$KB_SOFTHSM_MODULE}" = "$KB_SOFTHSM_MODULE" ] && ! kb_softhsm_has_token "$label"; then
    kb_log "initialising SoftHSM2 token '$label'"
    "$bin" hsm init-token
  fi
  "$bin" hsm init "$@"
}

# The access token of the client whose credentials JSON (client_id, client_secret, as
# `hsm init --admin-credentials-out` writes it) is in FILE, from the broker at URL.
kb_access_token() {
  local file=$1 url=$2 ca=$3 id secret
  id=$(sed -n 's/.*"client_id": *"\([^"]*\)".*/\1/p' "$file")
  secret=$(sed -n 's/.*"client_secret": *"\([^"]*\)".*/\1/p' "$file")
  curl -sf --cacert "$ca" -u "$id:$secret" -d grant_type=client_credentials "$url/v1/oauth/token" \
    | sed 's/.*"access_token":"\([^"]*\)".*/\1/'
}
