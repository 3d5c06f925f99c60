"""Secrets and hashes exactly as the Djinn server makes them, so both read each other's rows.

Encryption: the key is PBKDF2-HMAC-SHA256 of the config's `crypto.block`
(password) and `crypto.salt` (salt), 4096 rounds, 32 bytes; data is AES-GCM
sealed, the 12-byte nonce in front. Key material is stored as those raw bytes
(BYTEA), masked variable values as standard base64 of them.

Hashes: artifacts are named by a hashid (alphabet a-zA-Z0-9, minimum length 8,
salted with `crypto.salt`) of the decimal digits of the current Unix time in
nanoseconds, least significant first, as the server names the artifacts it creates.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from hashids import Hashids

from djinn.config import CryptoSettings
from djinn.errors import DjinnError

NONCE_SIZE = 12
KDF_ITERATIONS = 4096
HASH_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
HASH_MIN_LENGTH = 8


class CryptoError(DjinnError):
    """A secret could not be decrypted: wrong crypto settings, or corrupted data."""


def derive_key(block: str, salt: str) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt.encode(), iterations=KDF_ITERATIONS)
    return kdf.derive(block.encode())


class Cipher:
    def __init__(self, settings: CryptoSettings) -> None:
        self.settings = settings
        self._aead = AESGCM(derive_key(settings.block, settings.salt))

    def encrypt(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, None)

    def decrypt(self, data: bytes) -> bytes:
        try:
            if len(data) < NONCE_SIZE:
                raise InvalidTag()
            return self._aead.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], None)
        except InvalidTag:
            raise CryptoError("cannot decrypt a build secret: the crypto block/salt differ from the ones it was stored with") from None

    def encrypt_text(self, value: str) -> str:
        return base64.b64encode(self.encrypt(value.encode())).decode()

    def decrypt_text(self, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("cannot decrypt a masked variable: its value is not base64") from None
        return self.decrypt(raw).decode()


class Hasher:
    """Artifact hashes of the server's kind; each call gives a new one, even within one nanosecond."""

    def __init__(self, salt: str) -> None:
        self._hashids = Hashids(salt=salt, min_length=HASH_MIN_LENGTH, alphabet=HASH_ALPHABET)
        self._lock = threading.Lock()
        self._last = 0

    def hash_now(self) -> str:
        with self._lock:
            now = max(time.time_ns(), self._last + 1)
            self._last = now
        return self.hash_at(now)

    def hash_at(self, unix_ns: int) -> str:
        """The hash the server gives an artifact created at `unix_ns`: of its digits, last digit first."""
        return str(self._hashids.encode(*(int(d) for d in reversed(str(unix_ns)))))


_hashers: dict[str, Hasher] = {}


def hasher(settings: CryptoSettings | None) -> Hasher:
    """The hasher for the config's crypto salt (without a crypto block: an unsalted one)."""
    salt = settings.salt if settings is not None else ""
    if salt not in _hashers:
        _hashers[salt] = Hasher(salt)
    return _hashers[salt]
