#!/usr/bin/env bash
# The Python client library's tests: the offline ones (envelope known answers, retries and token
# renewal against a fake broker) and the live ones against the broker in KEYBROKER_URL, with the
# client in KEYBROKER_CLIENT_ID / KEYBROKER_CLIENT_SECRET and the admin token in KB_ADMIN_TOKEN
# (scripts/clients-test.sh sets them all). The package is installed the way its users install
# it (`pip install ./clients/python`) into a virtual environment kept in the cache.
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
cd "$KB_ROOT"

for var in KEYBROKER_URL KEYBROKER_CLIENT_ID KEYBROKER_CLIENT_SECRET KB_ADMIN_TOKEN; do
  [ -n "${!var:-}" ] || kb_die "$var is not set (run me through scripts/clients-test.sh)"
done

PYTEST_VERSION=8.3.4
# Debian keeps venv's pip bootstrap in a package of its own.
python3 -c 'import ensurepip, venv' 2>/dev/null || kb_install_packages python3-venv
VENV="$KB_CACHE_DIR/pyclient-pytest-$PYTEST_VERSION"
if [ ! -x "$VENV/bin/pytest" ]; then
  kb_log "creating $VENV (pytest $PYTEST_VERSION from PyPI)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "pytest==$PYTEST_VERSION"
fi
# Built from a copy, so the source tree gets no build/ or egg-info; installed anew each run
# (its dependencies, requests and cryptography, stay in the venv once there).
BUILD=$(mktemp -d /tmp/keybroker-pyclient.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
cp -r clients/python "$BUILD/src"
rm -rf "$BUILD/src/build" "$BUILD/src"/*.egg-info
"$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$BUILD/src"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "$BUILD/src"

# From outside the source tree, so `import keybroker` is the installed package.
cd "$BUILD"
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs "$KB_ROOT/clients/python/tests" "$@"
