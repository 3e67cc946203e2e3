#!/usr/bin/env bash
# The Rust client library's tests: unit tests (envelope known answers, cache bounds, backoff,
# Retry-After, the request loop against a scripted loopback server) and the live tests against
# the broker that scripts/clients-test.sh starts (KEYBROKER_URL, KEYBROKER_CA_FILE,
# KEYBROKER_CLIENT_ID, KEYBROKER_CLIENT_SECRET, KB_ADMIN_TOKEN in the environment).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo test -p keybroker-client --no-fail-fast
