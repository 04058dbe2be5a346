"""API keys: random tokens, stored only as a fast salted hash, matched in constant time.

A tenants file holds ``sha256$<salt hex>$<hex sha256(salt + key)>`` (as GitHub does for tokens;
``python -m vllm_steer.server.tenants hash-key``). A lookup hashes the presented key with every
credential's salt and compares with :func:`hmac.compare_digest`, with no early exit.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "HASH_SCHEME",
    "MAX_API_KEY_CHARS",
    "Credential",
    "generate_api_key",
    "hash_api_key",
    "bearer_token",
    "check_key_hash",
    "presented",
    "match",
]

HASH_SCHEME = "sha256"
MAX_API_KEY_CHARS = 4096
KEY_HASH = re.compile(r"sha256\$((?:[0-9a-f]{2}){8,64})\$([0-9a-f]{64})")
HASH_COMMAND = "python -m vllm_steer.server.tenants hash-key"

Holder = TypeVar("Holder")


def generate_api_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return "vsk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str, salt: bytes | None = None) -> str:
    """``sha256$<salt hex>$<hex sha256(salt + key)>``: what a tenants file stores instead of the key."""
    if not isinstance(key, str) or not key:
        raise ValueError("an API key is a non-empty string")
    salt = secrets.token_bytes(16) if salt is None else salt
    if not 8 <= len(salt) <= 64:
        raise ValueError("the salt must be 8 to 64 bytes")
    return f"{HASH_SCHEME}${salt.hex()}${hashlib.sha256(salt + key.encode()).hexdigest()}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_key_hash(value: str) -> str:
    """A tenants file's ``key_hash``, checked for shape; a plain-text key is refused without echoing it."""
    if not value.startswith(HASH_SCHEME + "$"):
        raise ValueError(
            f"looks like a plain-text API key; store only its hash (run `{HASH_COMMAND}` and paste its output)"
        )
    if not KEY_HASH.fullmatch(value):
        raise ValueError(f"malformed key hash; expected sha256$<salt hex>$<64 hex digits>, as `{HASH_COMMAND}` prints")
    return value


@dataclass(frozen=True, repr=False)
class Credential(Generic[Holder]):
    """A key hash, parsed, and whom it belongs to (a tenant, an admin's name); never shown in a repr."""

    salt: bytes
    digest: bytes
    holder: Holder

    @classmethod
    def from_hash(cls, key_hash: str, holder: Holder) -> Credential[Holder]:
        found = KEY_HASH.fullmatch(key_hash)
        assert found is not None  # the schema validated it
        return cls(bytes.fromhex(found.group(1)), bytes.fromhex(found.group(2)), holder)

    def __repr__(self) -> str:
        return f"Credential(holder={self.holder!r})"


def presented(api_key: str | None) -> bool:
    """Whether a request presented something that can be a key at all (else: "missing API key")."""
    return isinstance(api_key, str) and bool(api_key) and len(api_key) <= MAX_API_KEY_CHARS


def match(credentials: Iterable[Credential[Holder]], api_key: str) -> Holder | None:
    """The holder of ``api_key``; every credential is compared, so the time does not depend on which matches."""
    candidate = api_key.encode("utf-8", "surrogatepass")
    matched: Holder | None = None
    for credential in credentials:  # no early exit
        if hmac.compare_digest(hashlib.sha256(credential.salt + candidate).digest(), credential.digest):
            matched = credential.holder
    return matched
