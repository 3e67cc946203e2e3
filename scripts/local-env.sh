# Source this (`. scripts/local-env.sh`) to point the keybroker CLI at what ./scripts/run.sh set up
# under .local/: the token (KEYBROKER_TOKEN=softhsm, the default, or kryoptic, as given to
# run.sh), its PIN file and the local Postgres (which run.sh must be running).
# Example: target/release/keybroker client list
_kb_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "${KEYBROKER_TOKEN:-softhsm}" = kryoptic ]; then
  export KRYOPTIC_CONF="$_kb_root/.local/kryoptic/kryoptic.conf"
  export PKCS11_MODULE="${KB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker}/kryoptic-1.5.4/libkryoptic_pkcs11.so"
  export KEYBROKER_PIN_FILE="$_kb_root/.local/secrets/kryoptic-user.pin"
  _kb_db=keybroker_kryoptic
else
  export SOFTHSM2_CONF="$_kb_root/.local/softhsm/softhsm2.conf"
  export PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
  export KEYBROKER_PIN_FILE="$_kb_root/.local/secrets/user.pin"
  _kb_db=keybroker
fi
export KEYBROKER_TOKEN_LABEL=${KEYBROKER_TOKEN_LABEL:-keybroker}
export DATABASE_URL="postgres://postgres@127.0.0.1:$(cat "$_kb_root/.local/pg/port")/$_kb_db"
export PATH="$_kb_root/target/release:$PATH"
unset _kb_root _kb_db
