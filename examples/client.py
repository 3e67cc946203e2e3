#!/usr/bin/env python3
"""A keybroker client in plain Python 3 (standard library only).

Gets an access token with its client credentials (OAuth 2.0 client_credentials, HTTP Basic),
asks for a data key bound to an encryption context, keeps only the wrapped blob (as an
application would store it next to its data), and later unwraps it to get the key back.

    python3 examples/client.py      # after ./scripts/run.sh, from the repository root

KEYBROKER_URL, KEYBROKER_CA and KEYBROKER_CREDENTIALS (a JSON file with client_id and
client_secret) default to what ./scripts/run.sh sets up.
"""

import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

URL = os.environ.get("KEYBROKER_URL", "https://127.0.0.1:8443")
CA = os.environ.get("KEYBROKER_CA", ".local/tls/ca.pem")
CREDENTIALS = os.environ.get("KEYBROKER_CREDENTIALS", ".local/admin-credentials.json")
TLS = ssl.create_default_context(cafile=CA)


def get_token():
    """client_credentials grant with HTTP Basic; a machine client simply asks again on expiry."""
    with open(CREDENTIALS) as f:
        creds = json.load(f)
    basic = base64.b64encode(f"{creds['client_id']}:{creds['client_secret']}".encode()).decode()
    request = urllib.request.Request(
        URL + "/v1/oauth/token",
        data=urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
        headers={"Authorization": "Basic " + basic},
    )
    with urllib.request.urlopen(request, context=TLS, timeout=10) as response:
        return json.load(response)["access_token"]


TOKEN = get_token()


def call(path, body):
    """POSTs JSON; returns the decoded answer or raises with keybroker's error code."""
    request = urllib.request.Request(
        URL + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN},
    )
    try:
        with urllib.request.urlopen(request, context=TLS, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        error = json.load(e)["error"]
        raise RuntimeError(f"{path}: {e.code} {error['code']}: {error['message']}") from None


context = {"tenant": "acme", "table": "invoices"}

# 1. A new data key: use the plaintext to encrypt locally, store only the wrapped blob.
key = call("/v1/datakey", {"context": context})
dek = base64.b64decode(key["plaintext"])
blob = key["wrapped"]
print(f"data key: {len(dek) * 8} bits, sealed under master key v{key['mk_version']}")
print(f"wrapped:  {blob[:32]}…")

# 2. Later: get the key back from the blob with the same context.
again = base64.b64decode(call("/v1/unwrap", {"wrapped": blob, "context": context})["plaintext"])
assert again == dek, "unwrap returned another key"
print("unwrap:   same key back")

# 3. Another context cannot open it.
try:
    call("/v1/unwrap", {"wrapped": blob, "context": {"tenant": "someone-else"}})
    sys.exit("error: a blob opened under another context")
except RuntimeError as e:
    print(f"refused:  {e}")

# 4. Re-seal under the newest master key without ever seeing the key.
fresh = call("/v1/rewrap", {"wrapped": blob, "context": context})
print(f"rewrap:   now under master key v{fresh['mk_version']}")
