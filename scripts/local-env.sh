# Source this (`. scripts/local-env.sh`) to point the keybroker CLI at what ./scripts/run.sh set up
# under .local/: the SoftHSM2 token, its PIN file and the local Postgres (which run.sh must be
# running). Example: target/release/keybroker client list
_kb_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SOFTHSM2_CONF="$_kb_root/.local/softhsm/softhsm2.conf"
export PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
export KEYBROKER_TOKEN_LABEL=${KEYBROKER_TOKEN_LABEL:-keybroker}
export KEYBROKER_PIN_FILE="$_kb_root/.local/secrets/user.pin"
export DATABASE_URL="postgres://postgres@127.0.0.1:$(cat "$_kb_root/.local/pg/port")/keybroker"
export PATH="$_kb_root/target/release:$PATH"
unset _kb_root
