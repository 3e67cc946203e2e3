"""keybroker: a client for the keybroker HSM-backed key broker.

    from keybroker import Client
    with Client("https://127.0.0.1:8443", client_id, client_secret, ".local/tls/ca.pem") as kb:
        envelope = kb.encrypt(b"card 4111...", {"tenant": "acme"})
        assert kb.decrypt(envelope, {"tenant": "acme"}) == b"card 4111..."

:class:`Client` makes data keys, wraps, unwraps and rewraps (singly and in batches) and does
envelope encryption locally with AES-256-GCM (clients/ENVELOPE.md); :class:`DataKeyCache` bounds
the reuse of data keys; :mod:`keybroker.errors` has one exception per broker error code.
"""

from . import errors
from .cache import DataKeyCache
from .client import Client, DataKey, Wrapped, __version__
from .errors import *  # noqa: F401,F403  (one class per error code)
from .errors import (
    ClientError,
    ConnectionFailed,
    EnvelopeAuthenticationError,
    EnvelopeError,
    KeybrokerError,
    ServerError,
    ServerUnavailable,
)

__all__ = [
    "Client",
    "DataKey",
    "Wrapped",
    "DataKeyCache",
    "__version__",
] + list(errors.__all__)
