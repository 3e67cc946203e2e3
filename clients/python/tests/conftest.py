"""Live tests need a broker: KEYBROKER_URL, KEYBROKER_CA_FILE, KEYBROKER_CLIENT_ID,
KEYBROKER_CLIENT_SECRET (a client with datakey, wrap, unwrap, rewrap) and KB_ADMIN_TOKEN, as
scripts/clients-test.sh sets them. Without KEYBROKER_URL they are skipped (test.sh refuses to
run without it, so a real run never skips them)."""

import os
import uuid

import pytest
import requests

import keybroker

LIVE_VARS = ("KEYBROKER_URL", "KEYBROKER_CLIENT_ID", "KEYBROKER_CLIENT_SECRET", "KB_ADMIN_TOKEN")


def pytest_collection_modifyitems(config, items):
    missing = [v for v in LIVE_VARS if not os.environ.get(v)]
    if not missing:
        return
    skip = pytest.mark.skip(reason="no broker: set " + ", ".join(missing))
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "live: needs a running broker")


class Admin:
    """The bootstrap admin's token, for registering clients and changing settings."""

    def __init__(self):
        self.url = os.environ["KEYBROKER_URL"].rstrip("/")
        self.verify = os.environ.get("KEYBROKER_CA_FILE") or True
        self.headers = {"Authorization": "Bearer " + os.environ["KB_ADMIN_TOKEN"]}

    def request(self, method, path, **kw):
        r = requests.request(
            method, self.url + path, headers=self.headers, verify=self.verify, timeout=30, **kw
        )
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def register(self, scopes=("datakey", "wrap", "unwrap", "rewrap")):
        body = {
            "name": f"pyclient-test-{uuid.uuid4().hex[:8]}",
            "ip_mode": "none",
            "scopes": list(scopes),
        }
        answer = self.request("POST", "/v1/admin/clients", json=body)
        return answer["client"]["client_id"], answer["client_secret"]


@pytest.fixture(scope="session")
def admin():
    return Admin()


class Counted:
    """Wraps a client's HTTP exchange to count what reaches the broker, by path and status."""

    def __init__(self, client):
        self.paths = []
        self.statuses = []
        inner = client._send

        def send(method, path, **kw):
            answer = inner(method, path, **kw)
            self.paths.append(path)
            self.statuses.append((path, answer.status))
            return answer

        client._send = send

    def count(self, path):
        return self.paths.count(path)

    def reset(self):
        self.paths.clear()
        self.statuses.clear()


@pytest.fixture
def make_client():
    """A client of the broker (the shared test client unless credentials are given), with a
    call counter in ``.counted``; closed after the test."""
    made = []

    def make(credentials=None, **kw):
        client_id, secret = credentials or (
            os.environ["KEYBROKER_CLIENT_ID"],
            os.environ["KEYBROKER_CLIENT_SECRET"],
        )
        c = keybroker.Client(
            os.environ["KEYBROKER_URL"],
            client_id,
            secret,
            os.environ.get("KEYBROKER_CA_FILE") or None,
            **kw,
        )
        c.counted = Counted(c)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
