"""Encryption at rest: each stored row's content is one JSON document sealed with AES-256-GCM.

The key file holds `KEY_ID BASE64_32_BYTES` lines; the first key seals new rows, every key opens the
rows it sealed (each row stores its key id), so keys rotate by putting a new line first. The
authenticated data binds a row's content to its table, id and tenant: a sealed value copied onto
another row or tenant does not open. Without a key file rows are stored as plain JSON (key id "").
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class SealError(ValueError):
    pass


class Sealer:
    def __init__(self, keys: dict[str, bytes] | None = None, current: str | None = None):
        self._keys = {key_id: AESGCM(key) for key_id, key in (keys or {}).items()}
        self.current = current if keys else ""
        if keys and current not in self._keys:
            raise SealError(f"the current key {current!r} is not among the keys")

    @classmethod
    def from_file(cls, path: str | Path | None) -> "Sealer":
        if not path:
            return cls()
        keys, current = {}, None
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key_id, encoded = line.split()
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise SealError(f"{path}:{number}: expected 'KEY_ID BASE64_KEY'") from None
            if len(key) != 32:
                raise SealError(f"{path}:{number}: key {key_id!r} is {len(key)} bytes; AES-256 needs 32")
            keys[key_id] = key
            current = current or key_id
        if not keys:
            raise SealError(f"{path} holds no key")
        return cls(keys, current)

    @property
    def encrypts(self) -> bool:
        return bool(self.current)

    def seal(self, value, context: str) -> tuple[str, bytes]:
        """(key id, sealed bytes) of a JSON-able value; context names the row (table:id:tenant)."""
        plain = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        if not self.current:
            return "", plain
        nonce = os.urandom(NONCE_BYTES)
        return self.current, nonce + self._keys[self.current].encrypt(nonce, plain, context.encode())

    def open(self, key_id: str, sealed: bytes, context: str):
        if not key_id:
            return json.loads(sealed)
        aead = self._keys.get(key_id)
        if aead is None:
            raise SealError(f"a stored row was sealed with key {key_id!r}, which the key file no longer holds")
        try:
            plain = aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
        except Exception:
            raise SealError(f"a stored row does not open with key {key_id!r} (tampered, or moved)") from None
        return json.loads(plain)


def new_key_line(key_id: str) -> str:
    """A line for the key file: a fresh random 256-bit key."""
    return f"{key_id} {base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"
