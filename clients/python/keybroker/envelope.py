"""The envelope format of clients/ENVELOPE.md (version 1): pure code, no broker, no I/O.

``kbe`` | version ``01`` | u16 W | wrapped DEK (W bytes) | 12-byte nonce | ciphertext || tag,
encrypted with AES-256-GCM under the DEK with ``AAD = header || context_encoding``.
"""

import struct
from typing import Mapping, NamedTuple, Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import EnvelopeAuthenticationError, EnvelopeError

MAGIC = b"kbe"
VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
DEK_LEN = 32
_HEAD = 6  # magic, version, u16 W

Context = Optional[Mapping[str, str]]
KeyBytes = Union[bytes, bytearray, memoryview]


def encode_context(context: Context) -> bytes:
    """The context's canonical bytes: u32 count, then u32-length-prefixed key and value of each
    entry in ascending order of the keys' UTF-8 bytes (none is the empty map)."""
    entries = []
    for key, value in (context or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("an encryption context maps strings to strings")
        entries.append((key.encode("utf-8"), value.encode("utf-8")))
    # Sorting the encoded keys orders by UTF-8 bytes, as the Rust side's BTreeMap<String> does
    # (Python's str order is by code point, which agrees, but the bytes say it plainly).
    entries.sort()
    out = [struct.pack(">I", len(entries))]
    for key, value in entries:
        out += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
    return b"".join(out)


def header(wrapped: str) -> bytes:
    """Bytes ``0 .. 6+W`` of an envelope carrying ``wrapped``."""
    try:
        raw = wrapped.encode("ascii")
    except UnicodeEncodeError:
        raise EnvelopeError(None, "invalid_envelope", "the wrapped key is not ASCII") from None
    if not 1 <= len(raw) <= 0xFFFF:
        raise EnvelopeError(None, "invalid_envelope", "the wrapped key must be 1 to 65535 bytes")
    return MAGIC + bytes([VERSION]) + struct.pack(">H", len(raw)) + raw


class Parsed(NamedTuple):
    """An envelope split into its parts (nothing is authenticated yet)."""

    header: bytes
    wrapped: str
    nonce: bytes
    ciphertext: bytes  # with the tag at its end


def parse(envelope: bytes) -> Parsed:
    """Splits an envelope, refusing another magic or version and any too short for its fields.

    Raises:
        EnvelopeError: before any key is needed.
    """
    data = bytes(envelope)
    if len(data) < _HEAD or data[:3] != MAGIC:
        raise EnvelopeError(None, "invalid_envelope", "not a keybroker envelope (magic)")
    if data[3] != VERSION:
        raise EnvelopeError(None, "invalid_envelope", f"unsupported envelope version {data[3]}")
    (w,) = struct.unpack(">H", data[4:6])
    if w == 0 or len(data) < _HEAD + w + NONCE_LEN + TAG_LEN:
        raise EnvelopeError(None, "invalid_envelope", "the envelope is truncated")
    try:
        wrapped = data[_HEAD : _HEAD + w].decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(None, "invalid_envelope", "the wrapped key is not ASCII") from None
    end = _HEAD + w
    return Parsed(data[:end], wrapped, data[end : end + NONCE_LEN], data[end + NONCE_LEN :])


def seal(dek: KeyBytes, nonce: bytes, wrapped: str, plaintext: bytes, context: Context) -> bytes:
    """The envelope of ``plaintext`` under ``dek`` (which ``wrapped`` seals) and ``nonce``.

    The caller picks the nonce: ``os.urandom(12)`` in use, fixed values in the known-answer
    tests. A nonce must never repeat under one DEK; 96 random bits keep that true for the
    2**32 messages a cached DEK may encrypt at most (NIST SP 800-38D, 8.3).
    """
    if len(dek) != DEK_LEN:
        raise ValueError("a data key is 32 bytes")
    if len(nonce) != NONCE_LEN:
        raise ValueError("a nonce is 12 bytes")
    head = header(wrapped)
    aad = head + encode_context(context)
    return head + nonce + AESGCM(dek).encrypt(nonce, bytes(plaintext), aad)


def open_parsed(dek: KeyBytes, parsed: Parsed, context: Context) -> bytes:
    """The plaintext of a parsed envelope.

    Raises:
        EnvelopeAuthenticationError: GCM refused it (other bytes, other context, other key).
    """
    if len(dek) != DEK_LEN:
        raise EnvelopeAuthenticationError(
            None, "envelope_not_authentic", "the data key is not 32 bytes"
        )
    aad = parsed.header + encode_context(context)
    try:
        return AESGCM(dek).decrypt(parsed.nonce, parsed.ciphertext, aad)
    except InvalidTag:
        raise EnvelopeAuthenticationError(
            None,
            "envelope_not_authentic",
            "the envelope does not authenticate under this context",
        ) from None


def open_envelope(dek: KeyBytes, envelope: bytes, context: Context) -> bytes:
    """:func:`parse` then :func:`open_parsed`."""
    return open_parsed(dek, parse(envelope), context)
