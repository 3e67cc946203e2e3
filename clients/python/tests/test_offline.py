"""Offline: tokens, retries, backoff, errors and batches against a scripted fake broker."""

import base64
import json
import threading

import pytest

import keybroker
from keybroker import Client, DataKeyCache, errors
from keybroker.client import MAX_RETRY_AFTER, _Answer

SECRET = "s3cret-never-shown"
TOKEN = "tok-never-shown"


def answer(status, body=None, **headers):
    return _Answer(
        status,
        {k.replace("_", "-").lower(): str(v) for k, v in headers.items()},
        json.dumps(body if body is not None else {}).encode(),
    )


def api_error(status, code, **headers):
    return answer(
        status,
        {"error": {"code": code, "message": f"{code} happened"}},
        x_request_id="req-1",
        **headers,
    )


class FakeBroker:
    """Answers the token endpoint itself; every other call takes the next scripted answer
    (or a 200 with ``default``)."""

    def __init__(self, script=(), default=None, token_life=300):
        self.script = list(script)
        self.default = default or {"plaintext": base64.b64encode(b"k" * 32).decode()}
        self.token_life = token_life
        self.tokens = 0
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, method, path, *, headers, json_body=None, form=None):
        with self.lock:
            if path == "/v1/oauth/token":
                assert headers["Authorization"].startswith("Basic ")
                assert form == {"grant_type": "client_credentials"}
                self.tokens += 1
                return answer(
                    200,
                    {
                        "access_token": f"{TOKEN}-{self.tokens}",
                        "token_type": "Bearer",
                        "expires_in": self.token_life,
                        "scope": "datakey",
                    },
                )
            self.calls.append((path, headers["Authorization"], json_body))
            step = self.script.pop(0) if self.script else answer(200, self.default)
        if isinstance(step, Exception):
            raise step
        return step


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def client(broker, max_retries=4, cache=None):
    c = Client("https://broker.invalid", "client-1", SECRET, max_retries=max_retries, cache=cache)
    c._send = broker
    c._clock = Clock()
    c.slept = []
    c._sleep = c.slept.append
    c._random = lambda: 0.5
    return c


def test_503_and_429_are_retried_with_backoff_and_retry_after(caplog):
    caplog.set_level("DEBUG", logger="keybroker")
    broker = FakeBroker(
        [
            api_error(503, "hsm_unavailable"),
            api_error(429, "rate_limited", retry_after=2),
            api_error(503, "hsm_timeout"),
        ]
    )
    c = client(broker)
    assert c.unwrap("kb:v1:1:x") == b"k" * 32
    assert len(broker.calls) == 4
    first, second, third = c.slept
    assert 0 < first < 0.3  # backoff from 0.2 s, half of it random
    assert 2 <= second <= 3  # at least what Retry-After said
    assert third > first  # doubling
    assert "POST /v1/unwrap: 429; retry in" in caplog.text
    assert TOKEN not in caplog.text and SECRET not in caplog.text


def test_when_retries_run_out_the_typed_error_reaches_the_caller():
    broker = FakeBroker([api_error(429, "rate_limited", retry_after=1)] * 3)
    c = client(broker, max_retries=2)
    with pytest.raises(keybroker.RateLimited) as e:
        c.unwrap("kb:v1:1:x")
    assert len(broker.calls) == 3 and len(c.slept) == 2
    assert isinstance(e.value, keybroker.ClientError)
    assert (e.value.status, e.value.code, e.value.request_id) == (429, "rate_limited", "req-1")
    assert e.value.retry_after == 1

    broker = FakeBroker([api_error(503, "no_active_key")] * 5)
    with pytest.raises(keybroker.NoActiveKey) as e:
        client(broker).datakey()
    assert isinstance(e.value, keybroker.ServerUnavailable) and len(broker.calls) == 5


def test_a_long_retry_after_is_not_waited_for():
    broker = FakeBroker([api_error(429, "source_blocked", retry_after=int(MAX_RETRY_AFTER) + 1)])
    c = client(broker)
    with pytest.raises(keybroker.SourceBlocked):
        c.unwrap("kb:v1:1:x")
    assert c.slept == [] and len(broker.calls) == 1


def test_lost_connections_are_retried_then_reported_without_secrets():
    import requests

    boom = requests.ConnectionError(f"Authorization: Bearer {TOKEN}")
    broker = FakeBroker([boom, boom])
    c = client(broker, max_retries=1)
    with pytest.raises(keybroker.ConnectionFailed) as e:
        c.wrap(b"x" * 32)
    assert TOKEN not in str(e.value) and e.value.__cause__ is None
    assert len(c.slept) == 1


def test_other_errors_are_not_retried_and_map_by_code_then_status():
    broker = FakeBroker(
        [
            api_error(422, "context_mismatch"),
            api_error(418, "teapot"),
            api_error(500, "internal_error"),
            answer(502, None),
        ]
    )
    c = client(broker)
    with pytest.raises(keybroker.ContextMismatch):
        c.unwrap("kb:v1:1:x", {"a": "b"})
    with pytest.raises(keybroker.ClientError) as e:
        c.unwrap("kb:v1:1:x")
    assert type(e.value) is keybroker.ClientError and e.value.code == "teapot"
    with pytest.raises(keybroker.InternalError):
        c.unwrap("kb:v1:1:x")
    with pytest.raises(keybroker.ServerError):
        c.unwrap("kb:v1:1:x")
    assert c.slept == []


def test_token_is_renewed_before_it_runs_out():
    broker = FakeBroker(token_life=300)
    c = client(broker)
    c.unwrap("kb:v1:1:x")
    c._clock.now += 300 - 60 - 1  # 61 s left: more than max(30 s, 20 % of 300 s)
    c.unwrap("kb:v1:1:x")
    assert broker.tokens == 1
    c._clock.now += 2  # 59 s left
    c.unwrap("kb:v1:1:x")
    assert broker.tokens == 2
    assert [auth for _, auth, _ in broker.calls] == [f"Bearer {TOKEN}-1"] * 2 + [
        f"Bearer {TOKEN}-2"
    ]

    broker = FakeBroker(token_life=100)  # 20 % is 20 s: the 30 s floor decides
    c = client(broker)
    c.unwrap("kb:v1:1:x")
    c._clock.now += 69
    c.unwrap("kb:v1:1:x")
    c._clock.now += 2
    c.unwrap("kb:v1:1:x")
    assert broker.tokens == 2


def test_a_refused_token_is_replaced_once():
    broker = FakeBroker([api_error(401, "invalid_token")])
    c = client(broker)
    assert c.unwrap("kb:v1:1:x") == b"k" * 32
    assert broker.tokens == 2

    broker = FakeBroker([api_error(401, "invalid_token")] * 2)
    c = client(broker)
    with pytest.raises(keybroker.InvalidToken) as e:
        c.unwrap("kb:v1:1:x")
    assert broker.tokens == 2
    assert TOKEN not in str(e.value) and SECRET not in str(e.value)


def test_bad_credentials_raise_invalid_client():
    def refuse(method, path, *, headers, json_body=None, form=None):
        return answer(
            401, {"error": "invalid_client", "error_description": "client authentication failed"}
        )

    c = client(FakeBroker())
    c._send = refuse
    with pytest.raises(keybroker.InvalidClient) as e:
        c.datakey()
    assert e.value.status == 401 and SECRET not in str(e.value) and SECRET not in repr(c)


def test_one_token_for_many_threads():
    broker = FakeBroker()
    c = client(broker)
    threads = [
        threading.Thread(target=lambda: [c.unwrap("kb:v1:1:x") for _ in range(20)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert broker.tokens == 1 and len(broker.calls) == 160


def test_batches_give_results_and_typed_errors_in_order():
    key = base64.b64encode(b"q" * 32).decode()
    broker = FakeBroker(
        [
            answer(
                200,
                {
                    "items": [
                        {"plaintext": key},
                        {"error": {"code": "context_mismatch", "message": "no"}},
                        {"error": {"code": "new_code", "message": "?"}},
                    ]
                },
            )
        ]
    )
    c = client(broker)
    ok, mismatch, unknown = c.unwrap_batch(
        ["kb:v1:1:a", ("kb:v1:1:b", {"t": "x"}), "kb:v1:1:c"], context={"t": "y"}
    )
    assert ok == b"q" * 32
    assert isinstance(mismatch, keybroker.ContextMismatch) and mismatch.status == 422
    assert type(unknown) is keybroker.KeybrokerError
    sent = broker.calls[0][2]["items"]
    assert [i["context"] for i in sent] == [{"t": "y"}, {"t": "x"}, {"t": "y"}]


def test_data_keys_do_not_show_their_plaintext():
    dk = keybroker.DataKey(b"\x01" * 32, "kb:v1:1:x", 1)
    assert "\\x01" not in repr(dk) and "kb:v1:1:x" in repr(dk)


def test_every_code_has_its_class():
    assert errors.CODE_CLASSES["hsm_unavailable"] is keybroker.HsmUnavailable
    assert issubclass(keybroker.HsmUnavailable, keybroker.ServerUnavailable)
    assert issubclass(keybroker.ContextMismatch, keybroker.ClientError)
    for code, cls in errors.CODE_CLASSES.items():
        assert issubclass(cls, keybroker.KeybrokerError), code


def test_encrypt_and_decrypt_with_a_fake_broker_and_the_cache():
    key = base64.b64encode(bytes(range(32))).decode()
    broker = FakeBroker(default={"plaintext": key, "wrapped": "kb:v1:1:fake", "mk_version": 1})
    c = client(broker, cache=DataKeyCache(max_messages=3))
    envelopes = [c.encrypt(b"m%d" % i, {"t": "a"}) for i in range(7)]
    assert len(broker.calls) == 3  # 3 + 3 + 1 messages
    assert all(c.decrypt(e, {"t": "a"}) == b"m%d" % i for i, e in enumerate(envelopes))
    assert len(broker.calls) == 3  # the keys this process made are known to its decryption
    with pytest.raises(keybroker.EnvelopeError):
        c.decrypt(b"kbx" + envelopes[0][3:], {"t": "a"})
    assert len(broker.calls) == 3
