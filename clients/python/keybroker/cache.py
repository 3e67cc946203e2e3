"""An optional, bounded cache of data keys, in the manner of the AWS Encryption SDK's caching CMM.

Encryption reuses one data key per encryption context until any bound is hit (its age, the
messages or the plaintext bytes it has encrypted), so bulk encryption costs one broker call per
``max_messages`` messages. Decryption keeps unwrapped keys by (wrapped key, context), so reading
many envelopes under one data key costs one ``unwrap``.

Plaintext keys are held in ``bytearray``\\ s and overwritten with zeros when evicted (or when
:meth:`DataKeyCache.clear` is called). That is as far as Python lets a library go: the
interpreter, ``base64`` and OpenSSL make copies of their own that no Python code can reach, and
the garbage collector may leave old buffers in freed memory. Treat a process holding a cache as
holding the keys in it.
"""

import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable, Optional


class _Entry:
    __slots__ = ("key", "wrapped", "born", "messages", "bytes", "users", "evicted")

    def __init__(self, key: bytearray, wrapped: str, born: float) -> None:
        self.key = key
        self.wrapped = wrapped
        self.born = born
        self.messages = 0
        self.bytes = 0
        self.users = 0
        self.evicted = False

    def __repr__(self) -> str:  # never the key
        return f"<cached data key {self.wrapped[:16]}…, {self.messages} messages>"


class Lease:
    """A cached key in use: it is not wiped until released, even if evicted meanwhile."""

    __slots__ = ("_cache", "_entry")

    def __init__(self, cache: "DataKeyCache", entry: _Entry) -> None:
        self._cache = cache
        self._entry = entry

    @property
    def key(self) -> bytearray:
        return self._entry.key

    @property
    def wrapped(self) -> str:
        return self._entry.wrapped

    def release(self) -> None:
        self._cache._release(self._entry)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def wipe(buf: bytearray) -> None:
    """Overwrites a key buffer in place."""
    for i in range(len(buf)):
        buf[i] = 0


class DataKeyCache:
    """Bounds of reuse for data keys; share one between clients of the same broker client only.

    Args:
        max_age: seconds a data key may be used after the broker made (or unwrapped) it.
        max_messages: messages one data key may encrypt (at most 2**32).
        max_bytes: plaintext bytes one data key may encrypt; a single larger message gets a key
            of its own that is never cached.
        capacity: data keys kept for encryption, and as many for decryption (least recently
            used out first).
        clock: seconds, monotonic; tests pass their own.
    """

    def __init__(
        self,
        max_age: float = 300,
        max_messages: int = 2**32,
        max_bytes: int = 2**40,
        capacity: int = 1000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        if not 1 <= max_messages <= 2**32:
            # Beyond 2**32 messages random 96-bit nonces under one key are no longer safe.
            raise ValueError("max_messages must be 1 to 2**32")
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.max_age = max_age
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._encrypt: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._decrypt: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        # Striped locks under which one thread fetches a missing key while the others wait.
        self._fills = [threading.Lock() for _ in range(16)]

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(max_age={self.max_age}, max_messages={self.max_messages}, "
            f"max_bytes={self.max_bytes}, capacity={self.capacity}, "
            f"held={len(self._encrypt)}+{len(self._decrypt)})"
        )

    def held(self) -> int:
        """How many keys the cache holds now (for encryption and decryption together)."""
        with self._lock:
            return len(self._encrypt) + len(self._decrypt)

    # -- encryption -----------------------------------------------------------------------

    def fits(self, nbytes: int) -> bool:
        """Whether a message of this size may use a cached key at all."""
        return nbytes <= self.max_bytes

    def lease_for_encryption(self, context_key: Hashable, nbytes: int) -> Optional[Lease]:
        """A cached key for one more message of ``nbytes`` under this context, counted as
        used; ``None`` when there is none left within the bounds."""
        with self._lock:
            entry = self._encrypt.get(context_key)
            if entry is None:
                return None
            if (
                self._clock() - entry.born >= self.max_age
                or entry.messages >= self.max_messages
                or entry.bytes + nbytes > self.max_bytes
            ):
                self._evict(self._encrypt, context_key)
                return None
            self._encrypt.move_to_end(context_key)
            return self._use(self._encrypt, context_key, entry, nbytes)

    def add_for_encryption(
        self, context_key: Hashable, key: bytearray, wrapped: str, nbytes: int
    ) -> Lease:
        """Holds a new data key for this context, its first message of ``nbytes`` counted."""
        entry = _Entry(key, wrapped, self._clock())
        with self._lock:
            if context_key in self._encrypt:
                self._evict(self._encrypt, context_key)
            self._encrypt[context_key] = entry
            self._trim(self._encrypt)
            return self._use(self._encrypt, context_key, entry, nbytes)

    def _use(
        self, table: "OrderedDict", context_key: Hashable, entry: _Entry, nbytes: int
    ) -> Lease:
        entry.messages += 1
        entry.bytes += nbytes
        entry.users += 1
        if entry.messages >= self.max_messages or entry.bytes >= self.max_bytes:
            # Used up: out now, so it is wiped as soon as this message is done with it.
            self._evict(table, context_key)
        return Lease(self, entry)

    # -- decryption -----------------------------------------------------------------------

    def lease_for_decryption(self, wrapped: str, context_key: Hashable) -> Optional[Lease]:
        """The key unwrapped earlier from ``wrapped`` under this context, if still fresh."""
        slot = (wrapped, context_key)
        with self._lock:
            entry = self._decrypt.get(slot)
            if entry is None:
                return None
            if self._clock() - entry.born >= self.max_age:
                self._evict(self._decrypt, slot)
                return None
            self._decrypt.move_to_end(slot)
            entry.users += 1
            return Lease(self, entry)

    def add_for_decryption(self, wrapped: str, context_key: Hashable, key: bytearray) -> Lease:
        """Holds a key unwrapped from ``wrapped`` under this context (a copy of it is kept)."""
        entry = _Entry(key, wrapped, self._clock())
        slot = (wrapped, context_key)
        with self._lock:
            if slot in self._decrypt:
                self._evict(self._decrypt, slot)
            self._decrypt[slot] = entry
            self._trim(self._decrypt)
            entry.users += 1
            return Lease(self, entry)

    def filling(self, slot: Hashable) -> threading.Lock:
        """The lock to hold while fetching the key for ``slot``, so that threads missing the
        same key make one broker call, not one each (re-check the cache once holding it)."""
        return self._fills[hash(slot) % len(self._fills)]

    # -- housekeeping ---------------------------------------------------------------------

    def clear(self) -> None:
        """Drops every key, overwriting those not in use now (the others when released)."""
        with self._lock:
            for table in (self._encrypt, self._decrypt):
                for slot in list(table):
                    self._evict(table, slot)

    def _trim(self, table: "OrderedDict") -> None:
        while len(table) > self.capacity:
            self._evict(table, next(iter(table)))

    def _evict(self, table: "OrderedDict", slot: Hashable) -> None:
        entry = table.pop(slot)
        entry.evicted = True
        if entry.users == 0:
            wipe(entry.key)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                wipe(entry.key)
