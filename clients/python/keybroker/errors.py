"""Typed exceptions: one class per error code the broker sends, grouped by what a caller does next.

Every exception is a :class:`KeybrokerError` carrying ``status`` (the HTTP status, or ``None``
for errors found in this process), ``code`` (the broker's stable machine code), ``message`` (the
broker's human text, which never contains key material) and ``request_id`` (to find the request
in the broker's log). Codes the broker answers with a 4xx status are :class:`ClientError`\\ s, a
503 is a :class:`ServerUnavailable` (retried by the client before it reaches you), other 5xx
:class:`ServerError`. A code this library does not know maps to the group of its status, so a
newer broker never breaks ``except`` clauses.

Nothing here ever formats a secret, token or key into a message: only what the broker said.
"""

from typing import Dict, Optional, Type


class KeybrokerError(Exception):
    """Base of every error this library raises."""

    #: Seconds the broker asked to wait (``Retry-After``), on the answers that carry it.
    retry_after: Optional[float] = None

    def __init__(
        self,
        status: Optional[int],
        code: Optional[str],
        message: str,
        request_id: Optional[str] = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(self._text())

    def _text(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.request_id:
            text += f" (request {self.request_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )

    def __reduce__(self):
        # Exceptions cross process boundaries (multiprocessing, concurrent.futures): rebuild
        # from the four fields rather than from the formatted text.
        return (type(self), (self.status, self.code, self.message, self.request_id))


class ClientError(KeybrokerError):
    """A 4xx answer: the request, the credentials or the caller's rate was refused."""


class ServerError(KeybrokerError):
    """A 5xx answer other than 503: a fault in the broker (its log has the request id)."""


class ServerUnavailable(KeybrokerError):
    """A 503 answer: the token, the database or the active master key is unavailable for now."""


class ConnectionFailed(KeybrokerError):
    """No HTTP answer at all (refused connection, TLS failure, timeout), after the retries."""


class EnvelopeError(KeybrokerError):
    """An envelope refused before any broker call: another magic or version, or too short."""


class EnvelopeAuthenticationError(KeybrokerError):
    """AES-GCM refused the envelope: its bytes, or the context given, are not those encrypted."""


# The codes the broker sends (src/api/mod.rs, src/api/oauth.rs), each with its usual status.
# Some codes come with more than one status (`source_blocked` is 429 while a block lasts by
# itself and 403 for an officer's lockdown; `invalid_request` is 400 or 422): the exception then
# carries the status actually answered.
_CODES = {
    # 400
    "invalid_json": ("InvalidJson", 400),
    "invalid_base64": ("InvalidBase64", 400),
    "invalid_blob": ("InvalidBlob", 400),
    "unsupported_blob_version": ("UnsupportedBlobVersion", 400),
    "invalid_request": ("InvalidRequest", 400),
    "invalid_scope": ("InvalidScope", 400),
    "unsupported_grant_type": ("UnsupportedGrantType", 400),
    "invalid_grant": ("InvalidGrant", 400),
    # 401
    "invalid_token": ("InvalidToken", 401),
    "invalid_client": ("InvalidClient", 401),
    # 403
    "insufficient_scope": ("InsufficientScope", 403),
    "ip_not_allowed": ("IpNotAllowed", 403),
    "client_disabled": ("ClientDisabled", 403),
    "source_blocked": ("SourceBlocked", 403),
    # 404
    "not_found": ("NotFound", 404),
    "client_not_found": ("ClientNotFound", 404),
    "key_not_found": ("KeyNotFound", 404),
    "key_version_not_found": ("KeyVersionNotFound", 404),
    "secret_not_found": ("SecretNotFound", 404),
    "mk_version_not_found": ("MkVersionNotFound", 404),
    "no_rewrap_job": ("NoRewrapJob", 404),
    # 405, 409, 410, 413, 415
    "method_not_allowed": ("MethodNotAllowed", 405),
    "ip_already_registered": ("IpAlreadyRegistered", 409),
    "last_admin": ("LastAdmin", 409),
    "key_name_taken": ("KeyNameTaken", 409),
    "key_active": ("KeyActive", 409),
    "key_disabled": ("KeyDisabled", 409),
    "key_expired": ("KeyExpired", 409),
    "key_pending_deletion": ("KeyPendingDeletion", 409),
    "key_destroyed": ("KeyDestroyed", 410),
    "secret_active": ("SecretActive", 409),
    "secret_pending_deletion": ("SecretPendingDeletion", 409),
    "secret_destroyed": ("SecretDestroyed", 410),
    "concurrent_update": ("ConcurrentUpdate", 409),
    "mk_version_state": ("MkVersionState", 409),
    "mk_version_in_use": ("MkVersionInUse", 409),
    "rewrap_stuck": ("RewrapStuck", 409),
    "payload_too_large": ("PayloadTooLarge", 413),
    "unsupported_media_type": ("UnsupportedMediaType", 415),
    # 422
    "invalid_key_length": ("InvalidKeyLength", 422),
    "invalid_context": ("InvalidContext", 422),
    "unknown_mk_version": ("UnknownMkVersion", 422),
    "context_mismatch": ("ContextMismatch", 422),
    "batch_too_large": ("BatchTooLarge", 422),
    "empty_batch": ("EmptyBatch", 422),
    "rotation_period_required": ("RotationPeriodRequired", 422),
    "invalid_client_metadata": ("InvalidClientMetadata", 422),
    "block_not_allowed": ("BlockNotAllowed", 422),
    # 429
    "rate_limited": ("RateLimited", 429),
    # 500
    "internal_error": ("InternalError", 500),
    "server_error": ("OAuthServerError", 500),
    # 503
    "hsm_unavailable": ("HsmUnavailable", 503),
    "hsm_timeout": ("HsmTimeout", 503),
    "database_unavailable": ("DatabaseUnavailable", 503),
    "no_active_key": ("NoActiveKey", 503),
    "temporarily_unavailable": ("TemporarilyUnavailable", 503),
}


def _group(status: Optional[int]) -> Type[KeybrokerError]:
    if status == 503:
        return ServerUnavailable
    if status is not None and 400 <= status < 500:
        return ClientError
    if status is not None and status >= 500:
        return ServerError
    return KeybrokerError


#: Error code -> exception class.
CODE_CLASSES: Dict[str, Type[KeybrokerError]] = {}
for _code, (_name, _status) in _CODES.items():
    _cls = type(
        _name,
        (_group(_status),),
        {
            "__doc__": f"The broker's ``{_code}`` (usually HTTP {_status}).",
            "__module__": __name__,
            "default_status": _status,
        },
    )
    globals()[_name] = _cls
    CODE_CLASSES[_code] = _cls
del _code, _name, _status, _cls


def from_answer(
    status: Optional[int],
    code: Optional[str],
    message: str,
    request_id: Optional[str] = None,
) -> KeybrokerError:
    """The exception for an answer: by its code when known, else by its status."""
    cls = CODE_CLASSES.get(code or "")
    if cls is None:
        cls = _group(status)
    elif status is None:
        # A batch item's error carries no status of its own: take the code's usual one.
        status = getattr(cls, "default_status", None)
    return cls(status, code, message, request_id)


__all__ = [
    "KeybrokerError",
    "ClientError",
    "ServerError",
    "ServerUnavailable",
    "ConnectionFailed",
    "EnvelopeError",
    "EnvelopeAuthenticationError",
    "CODE_CLASSES",
    "from_answer",
] + [name for name, _ in _CODES.values()]
