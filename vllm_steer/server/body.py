"""The request body at the front door: read it (bounded), parse it (strict JSON), refuse what no tier could admit.

Used by :mod:`vllm_steer.server.middleware`; nothing here knows tenants or tiers.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive

from vllm_steer.core.errors import SteerError
from vllm_steer.core.request import is_steering_key
from vllm_steer.core.wire import RESERVED_XARGS_PREFIX

__all__ = ["MAX_BODY_BYTES", "BadBody", "read_body", "parse_body"]

MAX_BODY_BYTES = 32 * 1024 * 1024


class BadBody(SteerError):
    """A body no tier could admit (400, never logged as a policy decision)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadBody(key, "appears twice in the JSON object; send each field once")
        seen[key] = value
    return seen


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except BadBody:  # a duplicate key, named
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBody("body", f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadBody("body", "must be a JSON object")
    broken = _first_broken_text(body, "")
    if broken is not None:  # JSON's \ud800 escapes decode to text no engine can encode: vLLM answered 500
        raise BadBody(broken or "body", "is not valid Unicode text (it contains a lone surrogate escape)")
    stray = sorted(k for k in body if is_steering_key(k))
    if stray:
        raise BadBody(stray[0], "steering fields go inside vllm_xargs (extra_body={'vllm_xargs': {...}})")
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise BadBody("vllm_xargs", f"must be an object, got {type(xargs).__name__}")
    for key, value in (xargs or {}).items():
        if key.startswith(RESERVED_XARGS_PREFIX):
            raise BadBody(key, "is reserved for the server; remove it")
        if not _flat_value(value):
            raise BadBody(
                key or "vllm_xargs", f"vllm_xargs[{key!r}]: values must be a string, a number or a list of those"
            )
        if not all(
            _INT_MIN <= v <= _INT_MAX
            for v in (value if isinstance(value, list) else [value])
            if isinstance(v, int) and not isinstance(v, bool)
        ):
            # vLLM refuses these too, but names its internal field (extra_args), which the client never sent.
            raise BadBody(key or "vllm_xargs", f"vllm_xargs[{key!r}]: integers must be between -2**63 and 2**64 - 1")
    return body


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _flat_value(value: Any) -> bool:
    """What vLLM's ``vllm_xargs`` schema admits: a string or number, or a list of them."""
    scalar = (str, int, float)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _first_broken_text(value: Any, path: str) -> str | None:
    """The dotted path of the first key or string that cannot be encoded as UTF-8, if any."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if not _encodable(key):
                return path or "body"
            found = _first_broken_text(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_broken_text(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadBody("body", f"larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
