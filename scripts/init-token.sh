#!/usr/bin/env bash
# Officer ceremony: initialise a SoftHSM2 token and create keybroker's keys on it.
#
#   KEYBROKER_TOKEN_LABEL   token label (prompted if unset)
#   KEYBROKER_SO_PIN        security-officer PIN (prompted without echo if unset; SoftHSM2 only)
#   KEYBROKER_PIN           user PIN (prompted without echo if unset)
#   PKCS11_MODULE           another vendor's module: the token must already be initialised
#                           with the vendor's tools; only `keybroker hsm init` runs
#   DATABASE_URL            Postgres that records the master-key versions
#
# PINs are never taken as arguments and never printed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=${KEYBROKER_BIN:-}
if [ -z "$BIN" ]; then
  (cd "$KB_ROOT" && cargo build --release --quiet)
  BIN="$KB_ROOT/target/release/keybroker"
fi

ask() { # VAR PROMPT SECRET
  local var=$1 prompt=$2 secret=$3 value
  [ -n "${!var:-}" ] && return 0
  [ -t 0 ] || kb_die "$var is not set and there is no terminal to ask on"
  if [ "$secret" = yes ]; then read -rsp "$prompt: " value; echo >&2; else read -rp "$prompt: " value; fi
  [ -n "$value" ] || kb_die "$var must not be empty"
  export "$var=$value"
}

ask KEYBROKER_TOKEN_LABEL "Token label" no
[ -n "${DATABASE_URL:-}" ] || kb_die "set DATABASE_URL"
MODULE=${PKCS11_MODULE:-$KB_SOFTHSM_MODULE}
export PKCS11_MODULE=$MODULE
if [ "$MODULE" = "$KB_SOFTHSM_MODULE" ]; then
  command -v softhsm2-util >/dev/null || kb_install_deps
  if ! kb_has_token "$KEYBROKER_TOKEN_LABEL"; then
    ask KEYBROKER_SO_PIN "SO PIN for the new token" yes
  fi
else
  kb_log "vendor module $MODULE: skipping token initialisation"
fi
ask KEYBROKER_PIN "User PIN" yes
kb_init_token "$BIN" "$KEYBROKER_TOKEN_LABEL"
"$BIN" hsm status
