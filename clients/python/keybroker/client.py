"""The broker client: access tokens, retries, the data-key calls, and envelope encryption.

One :class:`Client` per broker client id, shared by any number of threads. It gets its access
token with the client-credentials grant and renews it before it runs out; every call is retried
with backoff on 429 and 503 (honouring ``Retry-After``) and on a lost connection, since all of
them are safe to repeat.
"""

import base64
import binascii
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import requests

from . import envelope as env
from .cache import DataKeyCache, wipe
from .errors import ConnectionFailed, KeybrokerError, from_answer

__version__ = "0.1.0"

# Retries only, at debug level: method, path, status and wait. Never a header or a body.
_log = logging.getLogger("keybroker")

Context = Optional[Mapping[str, str]]

#: Renew a token when less than this many seconds of it are left (or 20 % of its life).
RENEW_MIN_SECS = 30.0
RENEW_FRACTION = 0.2
#: A ``Retry-After`` longer than this is not waited for: the error goes to the caller at once,
#: who can decide (a blocked source is told to wait 15 minutes; no call should hang that long).
MAX_RETRY_AFTER = 60.0
#: Backoff without ``Retry-After``: doubling from this, up to ``BACKOFF_CAP``, half of it random.
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0


@dataclass(frozen=True)
class DataKey:
    """A new data key: ``plaintext`` (32 bytes, ``None`` when not asked for) to use now,
    ``wrapped`` to store beside the data, ``mk_version`` the master key that sealed it."""

    plaintext: Optional[bytes] = field(repr=False)
    wrapped: str
    mk_version: int


@dataclass(frozen=True)
class Wrapped:
    """Key material sealed by the broker: the blob and the master-key version that sealed it."""

    wrapped: str
    mk_version: int


class _Answer(NamedTuple):
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class _Token:
    __slots__ = ("value", "fetched", "life")

    def __init__(self, value: str, fetched: float, life: float) -> None:
        self.value = value
        self.fetched = fetched
        self.life = life

    def left(self, now: float) -> float:
        return self.fetched + self.life - now

    def due(self, now: float) -> bool:
        return self.left(now) < max(RENEW_MIN_SECS, RENEW_FRACTION * self.life)

    def __repr__(self) -> str:  # never the token itself
        return f"<access token, {self.life:.0f} s life>"


def _check_context(context: Context) -> Dict[str, str]:
    if context is None:
        return {}
    out = {}
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("an encryption context maps strings to strings")
        out[key] = value
    return out


def _blob(item: Any) -> str:
    """A wrapped key given as the string or as what :meth:`Client.wrap`/`datakey` returned."""
    wrapped = getattr(item, "wrapped", item)
    if not isinstance(wrapped, str):
        raise TypeError("a wrapped key is a str (kb:v1:...)")
    return wrapped


def _b64decode(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise KeybrokerError(None, "invalid_answer", f"the broker's {what} is not base64") from None


class Client:
    """A keybroker client, safe to share between threads.

    Args:
        url: the broker's base URL, e.g. ``https://127.0.0.1:8443``.
        client_id, client_secret: the client's credentials (``client_secret_basic``).
        ca_file: the CA certificate(s) to trust for the broker; default: the system's.
        timeout: seconds for each HTTP exchange.
        max_retries: retries of one call on 429, 503 or a lost connection (0: none).
        cache: an optional :class:`DataKeyCache` for :meth:`encrypt` and :meth:`decrypt`.

    Calls raise a :class:`~keybroker.errors.KeybrokerError` subclass named after the broker's
    error code (``ContextMismatch``, ``RateLimited``, ``HsmUnavailable``, ...).
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        client_secret: str,
        ca_file: Optional[str] = None,
        *,
        timeout: float = 10,
        max_retries: int = 4,
        cache: Optional[DataKeyCache] = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.url = url.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        # Given with every request: a session-wide `verify` loses to REQUESTS_CA_BUNDLE.
        self._verify: Union[str, bool] = ca_file or True
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache = cache
        self._token: Optional[_Token] = None
        self._token_lock = threading.Lock()
        self._local = threading.local()
        self._sessions: List[requests.Session] = []
        self._sessions_lock = threading.Lock()
        # Seams for tests: time, sleeping, randomness and the HTTP exchange itself.
        self._clock: Callable[[], float] = time.monotonic
        self._sleep: Callable[[float], None] = time.sleep
        self._random: Callable[[], float] = random.random
        self._send: Callable[..., _Answer] = self._send_http

    def __repr__(self) -> str:
        return f"Client({self.url!r}, client_id={self.client_id!r})"

    def close(self) -> None:
        """Closes the HTTP connections of every thread."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the data-key calls ---------------------------------------------------------------

    def datakey(self, context: Context = None, plaintext: bool = True) -> DataKey:
        """A new 32-byte data key bound to ``context`` (``POST /v1/datakey``)."""
        return self._datakey(self._call("/v1/datakey", self._datakey_body(context, plaintext)))

    def wrap(self, plaintext: bytes, context: Context = None) -> Wrapped:
        """Seals 16 to 64 bytes of key material under the active master key (``/v1/wrap``)."""
        return self._wrapped(self._call("/v1/wrap", self._wrap_body(plaintext, context)))

    def unwrap(self, wrapped: Union[str, DataKey, Wrapped], context: Context = None) -> bytes:
        """The key material sealed in ``wrapped`` under ``context`` (``/v1/unwrap``)."""
        return self._unwrapped(self._call("/v1/unwrap", self._blob_body(wrapped, context)))

    def rewrap(self, wrapped: Union[str, DataKey, Wrapped], context: Context = None) -> Wrapped:
        """``wrapped`` sealed again under the active master key (``/v1/rewrap``)."""
        return self._wrapped(self._call("/v1/rewrap", self._blob_body(wrapped, context)))

    def datakey_batch(
        self, contexts: Sequence[Context], plaintext: bool = True
    ) -> List[Union[DataKey, KeybrokerError]]:
        """One data key per context, in order; a failed item is its exception, not raised."""
        items = [self._datakey_body(c, plaintext) for c in contexts]
        return self._batch("/v1/datakey/batch", items, self._datakey)

    def wrap_batch(
        self, items: Sequence[Any], context: Context = None
    ) -> List[Union[Wrapped, KeybrokerError]]:
        """:meth:`wrap` for each item: key material, or a ``(key material, context)`` pair
        (``context`` is the default for bare items)."""
        bodies = [self._wrap_body(*self._pair(item, bytes, context)) for item in items]
        return self._batch("/v1/wrap/batch", bodies, self._wrapped)

    def unwrap_batch(
        self, items: Sequence[Any], context: Context = None
    ) -> List[Union[bytes, KeybrokerError]]:
        """:meth:`unwrap` for each item: a wrapped key, or a ``(wrapped, context)`` pair."""
        bodies = [self._blob_body(*self._pair(item, str, context)) for item in items]
        return self._batch("/v1/unwrap/batch", bodies, self._unwrapped)

    def rewrap_batch(
        self, items: Sequence[Any], context: Context = None
    ) -> List[Union[Wrapped, KeybrokerError]]:
        """:meth:`rewrap` for each item: a wrapped key, or a ``(wrapped, context)`` pair."""
        bodies = [self._blob_body(*self._pair(item, str, context)) for item in items]
        return self._batch("/v1/rewrap/batch", bodies, self._wrapped)

    # -- envelope encryption --------------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: Context = None) -> bytes:
        """``plaintext`` encrypted locally (AES-256-GCM) under a data key from the broker, as
        the envelope of clients/ENVELOPE.md, which carries the wrapped data key."""
        ctx = _check_context(context)
        data = bytes(plaintext)
        cache = self.cache
        if cache is None or not cache.fits(len(data)):
            key, wrapped = self._new_data_key(ctx)
            try:
                return env.seal(key, os.urandom(env.NONCE_LEN), wrapped, data, ctx)
            finally:
                wipe(key)
        slot = env.encode_context(ctx)
        lease = cache.lease_for_encryption(slot, len(data))
        if lease is None:
            # One thread asks the broker; the others for this context wait and share its key.
            with cache.filling(slot):
                lease = cache.lease_for_encryption(slot, len(data))
                if lease is None:
                    key, wrapped = self._new_data_key(ctx)
                    # The same process often reads back what it wrote: keep the key for that.
                    cache.add_for_decryption(wrapped, slot, bytearray(key)).release()
                    lease = cache.add_for_encryption(slot, key, wrapped, len(data))
        with lease:
            return env.seal(lease.key, os.urandom(env.NONCE_LEN), lease.wrapped, data, ctx)

    def decrypt(self, envelope: bytes, context: Context = None) -> bytes:
        """The plaintext of an envelope from :meth:`encrypt`, given the same context.

        Raises:
            EnvelopeError: not an envelope of a known version (before any broker call).
            ContextMismatch: the broker would not unwrap the data key under this context.
            EnvelopeAuthenticationError: GCM refused the envelope under this context.
        """
        parsed = env.parse(envelope)
        ctx = _check_context(context)
        cache = self.cache
        if cache is None:
            key = self._unwrap_key(parsed.wrapped, ctx)
            try:
                return env.open_parsed(key, parsed, ctx)
            finally:
                wipe(key)
        slot = env.encode_context(ctx)
        lease = cache.lease_for_decryption(parsed.wrapped, slot)
        if lease is None:
            with cache.filling((parsed.wrapped, slot)):
                lease = cache.lease_for_decryption(parsed.wrapped, slot)
                if lease is None:
                    key = self._unwrap_key(parsed.wrapped, ctx)
                    lease = cache.add_for_decryption(parsed.wrapped, slot, key)
        with lease:
            return env.open_parsed(lease.key, parsed, ctx)

    def _new_data_key(self, ctx: Dict[str, str]):
        answer = self._call("/v1/datakey", self._datakey_body(ctx, True))
        key = bytearray(_b64decode(answer.get("plaintext"), "data key"))
        if len(key) != env.DEK_LEN:
            wipe(key)
            raise KeybrokerError(None, "invalid_answer", "the broker's data key is not 32 bytes")
        return key, str(answer.get("wrapped"))

    def _unwrap_key(self, wrapped: str, ctx: Dict[str, str]) -> bytearray:
        answer = self._call("/v1/unwrap", self._blob_body(wrapped, ctx))
        return bytearray(_b64decode(answer.get("plaintext"), "data key"))

    # -- bodies and answers ---------------------------------------------------------------

    @staticmethod
    def _with_context(body: Dict[str, Any], context: Context) -> Dict[str, Any]:
        ctx = _check_context(context)
        if ctx:
            # None and {} are the same empty context: the broker binds no entries for either.
            body["context"] = ctx
        return body

    def _datakey_body(self, context: Context, plaintext: bool) -> Dict[str, Any]:
        return self._with_context({"plaintext": bool(plaintext)}, context)

    def _wrap_body(self, plaintext: bytes, context: Context) -> Dict[str, Any]:
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise TypeError("key material to wrap is bytes")
        text = base64.b64encode(bytes(plaintext)).decode("ascii")
        return self._with_context({"plaintext": text}, context)

    def _blob_body(self, wrapped: Any, context: Context) -> Dict[str, Any]:
        return self._with_context({"wrapped": _blob(wrapped)}, context)

    @staticmethod
    def _pair(item: Any, kind: type, default: Context):
        if isinstance(item, tuple):
            value, ctx = item
            return value, ctx
        if kind is str:
            return _blob(item), default
        return item, default

    @staticmethod
    def _datakey(answer: Dict[str, Any]) -> DataKey:
        text = answer.get("plaintext")
        plaintext = None if text is None else _b64decode(text, "data key")
        return DataKey(plaintext, str(answer["wrapped"]), int(answer["mk_version"]))

    @staticmethod
    def _wrapped(answer: Dict[str, Any]) -> Wrapped:
        return Wrapped(str(answer["wrapped"]), int(answer["mk_version"]))

    @staticmethod
    def _unwrapped(answer: Dict[str, Any]) -> bytes:
        return _b64decode(answer.get("plaintext"), "key material")

    def _batch(self, path: str, items: List[Dict[str, Any]], convert: Callable) -> List[Any]:
        answer = self._call(path, {"items": items})
        results = answer.get("items")
        if not isinstance(results, list) or len(results) != len(items):
            raise KeybrokerError(
                None, "invalid_answer", "the broker's batch answer has another length"
            )
        out: List[Any] = []
        for result in results:
            error = result.get("error") if isinstance(result, dict) else None
            if isinstance(error, dict):
                out.append(
                    from_answer(
                        None,
                        error.get("code"),
                        str(error.get("message", "")),
                        error.get("request_id"),
                    )
                )
            else:
                out.append(convert(result))
        return out

    # -- HTTP, tokens and retries ---------------------------------------------------------

    def _call(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        """POSTs JSON with the access token; renews the token once if the broker refuses it."""
        renewed = False
        while True:
            token = self._access_token()
            answer = self._exchange(
                "POST",
                path,
                headers={"Authorization": "Bearer " + token.value},
                json_body=body,
            )
            if answer.status == 401 and not renewed:
                # Revoked, or the broker's signing key rotated under it: one new token, once.
                error = self._error(answer)
                if error.code == "invalid_token":
                    self._drop_token(token)
                    renewed = True
                    continue
                raise error
            if 200 <= answer.status < 300:
                return self._json(answer)
            raise self._error(answer)

    def _access_token(self) -> _Token:
        with self._token_lock:
            token = self._token
            now = self._clock()
            if token is not None and not token.due(now):
                return token
            try:
                self._token = self._fetch_token()
            except KeybrokerError as e:
                # A renewal that fails while the old token is still good is not fatal yet.
                if token is not None and token.left(now) > 5 and not _is_refusal(e):
                    return token
                raise
            return self._token

    def _drop_token(self, token: _Token) -> None:
        with self._token_lock:
            if self._token is token:
                self._token = None

    def _fetch_token(self) -> _Token:
        basic = base64.b64encode(f"{self.client_id}:{self._secret}".encode("utf-8")).decode("ascii")
        fetched = self._clock()
        answer = self._exchange(
            "POST",
            "/v1/oauth/token",
            headers={"Authorization": "Basic " + basic},
            form={"grant_type": "client_credentials"},
        )
        if answer.status != 200:
            raise self._error(answer)
        body = self._json(answer)
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise KeybrokerError(None, "invalid_answer", "the token answer has no access_token")
        life = float(body.get("expires_in") or 0)
        return _Token(value, fetched, life)

    def _exchange(
        self,
        method: str,
        path: str,
        headers: Dict[str, str],
        json_body: Any = None,
        form: Optional[Dict[str, str]] = None,
    ) -> _Answer:
        """One request, repeated on 429, 503 and lost connections, at most ``max_retries`` times."""
        attempt = 0
        while True:
            try:
                answer = self._send(method, path, headers=headers, json_body=json_body, form=form)
            except requests.RequestException as e:
                if attempt >= self.max_retries:
                    # The class of the failure only: requests' messages may quote headers.
                    raise ConnectionFailed(
                        None, None, f"{method} {path}: no answer ({type(e).__name__})"
                    ) from None
                wait = self._backoff(attempt)
                _log.debug(
                    "%s %s: no answer (%s); retry in %.2f s", method, path, type(e).__name__, wait
                )
                self._sleep(wait)
                attempt += 1
                continue
            if answer.status not in (429, 503) or attempt >= self.max_retries:
                return answer
            wait = self._retry_wait(answer, attempt)
            if wait is None:
                return answer
            _log.debug("%s %s: %d; retry in %.2f s", method, path, answer.status, wait)
            self._sleep(wait)
            attempt += 1

    def _retry_wait(self, answer: _Answer, attempt: int) -> Optional[float]:
        retry_after = _retry_after(answer)
        if retry_after is None:
            return self._backoff(attempt)
        if retry_after > MAX_RETRY_AFTER:
            return None
        # At least what the broker asked, plus a little so clients told alike do not come
        # back in the same millisecond.
        return retry_after + self._random() * min(1.0, 0.1 + 0.1 * retry_after)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2**attempt))
        return ceiling / 2 + self._random() * ceiling / 2

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            # requests' Session is not documented as thread-safe: one per thread.
            session = requests.Session()
            session.headers["User-Agent"] = f"keybroker-python/{__version__}"
            session.headers["Accept"] = "application/json"
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _send_http(
        self,
        method: str,
        path: str,
        *,
        headers: Dict[str, str],
        json_body: Any = None,
        form: Optional[Dict[str, str]] = None,
    ) -> _Answer:
        response = self._session().request(
            method,
            self.url + path,
            headers=headers,
            json=json_body,
            data=form,
            timeout=self.timeout,
            verify=self._verify,
            allow_redirects=False,
        )
        lowered = {k.lower(): v for k, v in response.headers.items()}
        return _Answer(response.status_code, lowered, response.content)

    @staticmethod
    def _json(answer: _Answer) -> Dict[str, Any]:
        try:
            body = json.loads(answer.body)
        except ValueError:
            raise KeybrokerError(
                answer.status, "invalid_answer", "the broker's answer is not JSON"
            ) from None
        if not isinstance(body, dict):
            raise KeybrokerError(
                answer.status, "invalid_answer", "the broker's answer is not an object"
            )
        return body

    @staticmethod
    def _error(answer: _Answer) -> KeybrokerError:
        """The typed exception for an error answer, in the API's shape or OAuth's."""
        code = None
        message = f"HTTP {answer.status}"
        request_id = answer.headers.get("x-request-id")
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict):  # {"error": {"code", "message", "request_id"?}}
                code = error.get("code")
                message = str(error.get("message") or message)
                request_id = error.get("request_id") or request_id
            elif isinstance(error, str):  # RFC 6749: {"error", "error_description"}
                code = error
                message = str(body.get("error_description") or message)
        exc = from_answer(answer.status, code, message, request_id)
        exc.retry_after = _retry_after(answer)
        return exc


def _retry_after(answer: _Answer) -> Optional[float]:
    value = answer.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: the broker never sends one; back off instead
    return max(0.0, seconds)


def _is_refusal(error: Exception) -> bool:
    """Whether the token endpoint refused the credentials themselves (no point in waiting)."""
    status = getattr(error, "status", None)
    return status is not None and 400 <= status < 500 and status != 429
