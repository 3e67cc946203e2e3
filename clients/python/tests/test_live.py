"""Live: the library against a real broker (SoftHSM2, Postgres, HTTPS), as an application uses it."""

import os
import time

import pytest

import keybroker
from keybroker import DataKeyCache
from keybroker import envelope as env

pytestmark = pytest.mark.live

ACME = {"tenant": "acme", "table": "invoices"}
OTHER = {"tenant": "someone-else"}
# How long to keep polling for something the broker does "within 1 s" on a loaded machine.
PATIENCE = 20.0


def test_datakey_wrap_unwrap_rewrap(make_client):
    c = make_client()
    dk = c.datakey(ACME)
    assert len(dk.plaintext) == 32 and dk.wrapped.startswith("kb:v1:") and dk.mk_version >= 1
    assert c.unwrap(dk.wrapped, ACME) == dk.plaintext
    assert c.unwrap(dk, ACME) == dk.plaintext  # the dataclass is accepted as well

    bare = c.datakey(plaintext=False)
    assert bare.plaintext is None and bare.wrapped.startswith("kb:v1:")
    assert len(c.unwrap(bare.wrapped)) == 32

    material = os.urandom(48)
    sealed = c.wrap(material, ACME)
    assert sealed.wrapped != dk.wrapped and sealed.mk_version >= 1
    assert c.unwrap(sealed, ACME) == material

    again = c.rewrap(sealed, ACME)
    assert again.wrapped != sealed.wrapped
    assert c.unwrap(again, ACME) == material


def test_batches_answer_in_order_with_per_item_errors(make_client, admin):
    # A client of its own: a refused unwrap counts towards the broker's anomaly response.
    c = make_client(admin.register())
    keys = c.datakey_batch([ACME, None, OTHER])
    assert [len(k.plaintext) for k in keys] == [32, 32, 32]
    assert c.counted.count("/v1/datakey/batch") == 1

    material = [os.urandom(32), os.urandom(16)]
    sealed = c.wrap_batch([material[0], (material[1], OTHER)], context=ACME)
    assert all(isinstance(s, keybroker.Wrapped) for s in sealed)

    opened = c.unwrap_batch(
        [
            (keys[0].wrapped, ACME),
            (keys[1].wrapped, None),
            (keys[2].wrapped, ACME),
            (sealed[0], ACME),
            (sealed[1], OTHER),
        ]
    )
    assert opened[0] == keys[0].plaintext and opened[1] == keys[1].plaintext
    assert isinstance(opened[2], keybroker.ContextMismatch) and opened[2].status == 422
    assert opened[3:] == material

    rewrapped = c.rewrap_batch([sealed[0], "kb:v1:1:not-a-blob"], context=ACME)
    assert c.unwrap(rewrapped[0], ACME) == material[0]
    assert isinstance(rewrapped[1], keybroker.ClientError)
    assert c.counted.count("/v1/rewrap/batch") == 1


def test_encrypt_then_decrypt(make_client):
    c = make_client()
    for message in [b"", b"hello, keybroker", os.urandom(1 << 20)]:
        envelope = c.encrypt(message, ACME)
        assert envelope[:4] == b"kbe\x01" and len(envelope) > len(message) + 28
        assert env.parse(envelope).wrapped.startswith("kb:v1:")
        assert c.decrypt(envelope, ACME) == message
    # Without a cache each envelope has its own data key.
    assert c.counted.count("/v1/datakey") == 3 and c.counted.count("/v1/unwrap") == 3
    # A refused envelope never reaches the broker.
    c.counted.reset()
    with pytest.raises(keybroker.EnvelopeError):
        c.decrypt(b"kbe\x02" + envelope[4:], ACME)
    assert c.counted.paths == []


def test_decrypt_under_another_context_fails(make_client, admin):
    credentials = admin.register()
    writer = make_client(credentials)
    envelope = writer.encrypt(b"for acme only", ACME)

    # The broker refuses to unwrap the data key under another context.
    reader = make_client(credentials)
    with pytest.raises(keybroker.ContextMismatch) as e:
        reader.decrypt(envelope, OTHER)
    assert e.value.status == 422 and e.value.request_id

    # A cache holding that key (under ACME) does not hand it out for OTHER: the broker is asked,
    # and refuses.
    cached = make_client(credentials, cache=DataKeyCache())
    assert cached.decrypt(envelope, ACME) == b"for acme only"
    with pytest.raises(keybroker.ContextMismatch):
        cached.decrypt(envelope, OTHER)

    # Where the key does come from the cache, GCM holds the line: this envelope names the
    # cached (ACME) data key but was encrypted under another key and context. No broker call.
    foreign = writer.encrypt(b"for someone else", OTHER)
    spliced = env.header(env.parse(envelope).wrapped) + foreign[len(env.parse(foreign).header) :]
    cached.counted.reset()
    with pytest.raises(keybroker.EnvelopeAuthenticationError):
        cached.decrypt(spliced, ACME)
    assert cached.counted.paths == []


def test_cache_makes_one_datakey_call_for_many_encryptions(make_client):
    c = make_client(cache=DataKeyCache(max_messages=50))
    messages = [os.urandom(100) for _ in range(200)]
    envelopes = [c.encrypt(m, ACME) for m in messages]
    assert c.counted.count("/v1/datakey") == 4
    assert len({env.parse(e).wrapped for e in envelopes}) == 4
    assert len({env.parse(e).nonce for e in envelopes}) == 200

    # This client knows its own keys; another one unwraps each data key once.
    assert [c.decrypt(e, ACME) for e in envelopes] == messages
    assert c.counted.count("/v1/unwrap") == 0
    reader = make_client(cache=DataKeyCache())
    assert [reader.decrypt(e, ACME) for e in envelopes] == messages
    assert reader.counted.count("/v1/unwrap") == 4


def test_cache_respects_each_bound(make_client):
    # Messages per key.
    c = make_client(cache=DataKeyCache(max_messages=3))
    for _ in range(10):
        c.encrypt(b"x", ACME)
    assert c.counted.count("/v1/datakey") == 4

    # Bytes per key: two 100-byte messages fit in 250; a message above the bound gets a key
    # of its own, never cached.
    c = make_client(cache=DataKeyCache(max_bytes=250))
    for _ in range(10):
        c.encrypt(bytes(100), ACME)
    assert c.counted.count("/v1/datakey") == 5
    c.counted.reset()
    big = [c.encrypt(bytes(251), ACME) for _ in range(3)]
    assert c.counted.count("/v1/datakey") == 3
    assert len({env.parse(e).wrapped for e in big}) == 3

    # Age, on the cache's own clock; decryption keys age out too.
    now = [0.0]
    c = make_client(cache=DataKeyCache(max_age=60, clock=lambda: now[0]))
    first = c.encrypt(b"a", ACME)
    c.encrypt(b"b", ACME)
    assert c.counted.count("/v1/datakey") == 1
    now[0] = 59.9
    c.encrypt(b"c", ACME)
    c.decrypt(first, ACME)
    assert c.counted.count("/v1/datakey") == 1 and c.counted.count("/v1/unwrap") == 0
    now[0] = 60.0
    c.encrypt(b"d", ACME)
    assert c.counted.count("/v1/datakey") == 2
    assert c.decrypt(first, ACME) == b"a"
    assert c.counted.count("/v1/unwrap") == 1

    # One key per context, and the capacity (least recently used out first).
    c = make_client(cache=DataKeyCache(capacity=2))
    for ctx in [ACME, OTHER, ACME, OTHER]:
        c.encrypt(b"m", ctx)
    assert c.counted.count("/v1/datakey") == 2
    third = {"tenant": "third"}
    c.encrypt(b"m", third)  # ACME is the least recently used: evicted
    c.encrypt(b"m", OTHER)
    assert c.counted.count("/v1/datakey") == 3
    c.encrypt(b"m", ACME)
    assert c.counted.count("/v1/datakey") == 4


def test_evicted_keys_are_overwritten(make_client):
    cache = DataKeyCache(max_messages=2)
    c = make_client(cache=cache)
    c.encrypt(b"1", ACME)
    entry = cache._encrypt[env.encode_context(ACME)]
    assert any(entry.key)
    c.encrypt(b"2", ACME)  # the second message uses it up
    assert entry.key == bytearray(32)
    cache.clear()
    assert cache.held() == 0


def test_token_is_renewed_when_old(make_client):
    c = make_client()
    c.datakey()
    assert c.counted.count("/v1/oauth/token") == 1
    life = c._token.life
    assert life > 0
    # The client's clock says the token is nearly spent: it asks for a new one first.
    shift = c._token.fetched + life * 0.85 - time.monotonic()
    c._clock = lambda: time.monotonic() + shift
    c.datakey()
    assert c.counted.count("/v1/oauth/token") == 2
    c.datakey()
    assert c.counted.count("/v1/oauth/token") == 2


def test_revoked_token_is_replaced(make_client, admin):
    c = make_client(admin.register())
    c.datakey()
    old = c._token.value
    # A client may revoke its own token (RFC 7009).
    import requests

    r = requests.post(
        c.url + "/v1/oauth/revoke",
        data={"token": old},
        headers={"Authorization": "Bearer " + old},
        verify=c._verify,
        timeout=30,
    )
    assert r.status_code == 200
    # Revocation reaches every node within 1 s: keep calling until the broker refuses the old
    # token and the client has fetched a new one, each call succeeding all the same.
    deadline = time.monotonic() + PATIENCE
    while c.counted.count("/v1/oauth/token") < 2:
        assert time.monotonic() < deadline, "the revoked token was never refused"
        c.datakey()
        time.sleep(0.05)
    assert (("/v1/datakey", 401)) in c.counted.statuses
    assert c._token.value != old


def test_429_is_retried_then_raised_when_retries_run_out(make_client, admin):
    credentials = admin.register()
    patient = make_client(credentials)
    impatient = make_client(credentials, max_retries=0)
    # Tokens first, so that what the rate below refuses are data-key calls. Both are the same
    # client id, so they share the broker's allowance.
    patient.datakey()
    impatient.datakey()
    with _rate_of_one_per_second(admin):
        time.sleep(1.1)  # a full allowance
        for _ in range(3):
            patient.datakey()
        refused = [s for s in patient.counted.statuses if s == ("/v1/datakey", 429)]
        assert len(refused) >= 2  # each of the last two waited for its turn
        with pytest.raises(keybroker.RateLimited) as e:
            for _ in range(3):
                impatient.datakey()
        assert e.value.status == 429 and e.value.retry_after >= 1
        assert isinstance(e.value, keybroker.ClientError)


class _rate_of_one_per_second:
    """One request per second per client, burst 1, for the `with` block; then the old settings
    again (the admin's own allowance is that rate too, so the restoring call may have to wait)."""

    def __init__(self, admin):
        self.admin = admin

    def __enter__(self):
        self.saved = self.admin.request("GET", "/v1/admin/security-settings")
        self.admin.request(
            "PUT",
            "/v1/admin/security-settings",
            json=dict(self.saved, per_client_per_second=1.0, per_client_burst=1),
        )

    def __exit__(self, *exc):
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                self.admin.request("PUT", "/v1/admin/security-settings", json=self.saved)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def test_command_line_round_trip(tmp_path):
    import subprocess
    import sys

    run = lambda *args, data: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "keybroker", *args], input=data, capture_output=True, check=False
    )
    plaintext = os.urandom(5000)
    enc = run("encrypt", "--context", "tenant=acme", "--context", "table=invoices", data=plaintext)
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout[:4] == b"kbe\x01"
    dec = run("decrypt", "--context", "table=invoices", "tenant=acme", data=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == plaintext
    bad = run("decrypt", data=b"not an envelope")
    assert bad.returncode == 1 and b"invalid_envelope" in bad.stderr
    assert (
        os.environ["KEYBROKER_CLIENT_SECRET"].encode() not in enc.stderr + dec.stderr + bad.stderr
    )


def test_threads_share_one_client_and_its_cache(make_client):
    from concurrent.futures import ThreadPoolExecutor

    c = make_client(cache=DataKeyCache(max_messages=100))
    messages = [os.urandom(64) for _ in range(400)]
    with ThreadPoolExecutor(8) as pool:
        envelopes = list(pool.map(lambda m: c.encrypt(m, ACME), messages))
    # Threads that miss the cache together wait for one fetch: exactly one call per 100.
    assert c.counted.count("/v1/datakey") == 4
    assert c.counted.count("/v1/oauth/token") == 1
    reader = make_client(cache=DataKeyCache())
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda e: reader.decrypt(e, ACME), envelopes)) == messages
    assert reader.counted.count("/v1/unwrap") == 4
