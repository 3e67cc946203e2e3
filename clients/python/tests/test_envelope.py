"""Offline: the known answers of clients/envelope-vectors.json, which the Rust library also meets."""

import base64
import json
import pathlib

import pytest

from keybroker import EnvelopeAuthenticationError, EnvelopeError
from keybroker import envelope as env

VECTORS = json.loads(
    (pathlib.Path(__file__).resolve().parents[2] / "envelope-vectors.json").read_text("utf-8")
)


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_encrypt_gives_exactly_the_envelope(v):
    envelope = env.seal(
        bytes.fromhex(v["dek_hex"]),
        bytes.fromhex(v["nonce_hex"]),
        v["wrapped"],
        bytes.fromhex(v["plaintext_hex"]),
        v["context"],
    )
    assert base64.b64encode(envelope).decode() == v["envelope_b64"]
    # The AAD too, so a mismatch says which half is wrong.
    assert env.header(v["wrapped"]) + env.encode_context(v["context"]) == bytes.fromhex(
        v["aad_hex"]
    )


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_decrypt_gives_the_plaintext(v):
    envelope = base64.b64decode(v["envelope_b64"])
    parsed = env.parse(envelope)
    assert parsed.wrapped == v["wrapped"]
    assert env.open_parsed(bytearray.fromhex(v["dek_hex"]), parsed, v["context"]) == bytes.fromhex(
        v["plaintext_hex"]
    )


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_another_context_fails_at_gcm(v):
    other = dict(v["context"], extra="1")
    with pytest.raises(EnvelopeAuthenticationError):
        env.open_envelope(bytes.fromhex(v["dek_hex"]), base64.b64decode(v["envelope_b64"]), other)


@pytest.mark.parametrize("v", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_envelopes_are_refused_before_any_key(v):
    with pytest.raises(EnvelopeError):
        env.parse(base64.b64decode(v["envelope_b64"]))


@pytest.mark.parametrize("v", VECTORS["tampered"], ids=lambda v: v["name"])
def test_tampered_envelopes_fail_gcm(v):
    envelope = base64.b64decode(v["envelope_b64"])
    env.parse(envelope)  # well-formed
    with pytest.raises(EnvelopeAuthenticationError):
        env.open_envelope(bytes.fromhex(v["dek_hex"]), envelope, v["context"])


def test_context_order_is_by_utf8_bytes_and_values_must_be_strings():
    assert env.encode_context({"b": "2", "a": "1"}) == env.encode_context({"a": "1", "b": "2"})
    assert env.encode_context(None) == env.encode_context({}) == b"\x00\x00\x00\x00"
    with pytest.raises(TypeError):
        env.encode_context({"n": 1})


def test_shortest_envelope_boundaries():
    wrapped = "kb:v1:1:x"
    ok = env.header(wrapped) + bytes(12 + 16)
    assert env.parse(ok).ciphertext == bytes(16)
    with pytest.raises(EnvelopeError):
        env.parse(ok[:-1])
    with pytest.raises(EnvelopeError):
        env.parse(b"kbe\x01\x00\x00" + bytes(40))  # W = 0
    with pytest.raises(EnvelopeError):
        env.parse(b"kb")
