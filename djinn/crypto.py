"""Encryption of key material and masked variable values at rest (AES-GCM).

The key is derived from the config's `crypto.block` and `crypto.salt`, so the
server that submits and the worker that runs share secrets through the config.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from djinn.config import CryptoSettings
from djinn.errors import DjinnError

NONCE_SIZE = 12


class CryptoError(DjinnError):
    """A secret could not be decrypted: wrong crypto settings, or corrupted data."""


class Cipher:
    def __init__(self, settings: CryptoSettings) -> None:
        kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=settings.salt.encode(), iterations=100_000)
        self._aead = AESGCM(kdf.derive(settings.block.encode()))

    def encrypt(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, None)

    def decrypt(self, data: bytes) -> bytes:
        try:
            return self._aead.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], None)
        except InvalidTag:
            raise CryptoError("cannot decrypt a build secret: the crypto block/salt differ from the ones it was stored with") from None

    def encrypt_text(self, value: str) -> str:
        return base64.b64encode(self.encrypt(value.encode())).decode()

    def decrypt_text(self, value: str) -> str:
        return self.decrypt(base64.b64decode(value)).decode()
