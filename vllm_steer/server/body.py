"""The request body at the front door: read it (bounded), parse it (strict JSON), refuse what no tier could admit.

Used by :mod:`vllm_steer.server.middleware`; nothing here knows tenants or tiers.

Bounds, each a 4xx rather than a 5xx or a stalled server:

* size: :func:`body_limit` sizes the cap for the model's context, :func:`read_body` refuses beyond it (413),
  from the ``Content-Length`` header before reading when it declares too much;
* depth: JSON nested deeper than :data:`MAX_JSON_DEPTH` is refused (400) before the parser or any walk
  over the value could run out of stack (``RecursionError`` answered 500);
* time: :func:`parse_body_async` parses a large body in a worker thread, so the event loop keeps serving
  other requests (and streaming their tokens) meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.types import Receive

from vllm_steer.core.errors import SteerError
from vllm_steer.core.request import is_steering_key
from vllm_steer.core.wire import RESERVED_XARGS_PREFIX

__all__ = [
    "MAX_BODY_BYTES",
    "MIN_BODY_BYTES",
    "BODY_BYTES_PER_TOKEN",
    "MAX_JSON_DEPTH",
    "INLINE_PARSE_BYTES",
    "BadBody",
    "body_limit",
    "declared_length",
    "read_body",
    "parse_body",
    "parse_body_async",
]

MAX_BODY_BYTES = 16 * 1024 * 1024
"""The cap on any request body, whatever the model's context."""
MIN_BODY_BYTES = 1024 * 1024
"""The cap is never below this: a short-context model still takes long chat histories, tool schemas, ..."""
BODY_BYTES_PER_TOKEN = 64
"""Bytes of body allowed per token of context. A token is a few bytes of text (~4 in English, more in
other scripts and as JSON escapes: ``\\u00e9`` is 6 bytes for one character), or up to ~7 bytes as a token
id in a JSON list (``123456,``); chat bodies add per-message overhead (``{"role": ..., "content": ...}``),
tool schemas and sampling fields. 64 leaves ample room for every honest body that fits the context."""
MAX_JSON_DEPTH = 64
"""Deepest JSON nesting admitted (objects and arrays); no OpenAI request needs more than a handful."""
INLINE_PARSE_BYTES = 64 * 1024
""":func:`parse_body_async` parses bodies up to this size on the event loop (cheaper than a thread hop)."""


class BadBody(SteerError):
    """A body no tier could admit (``status``: 400, or 413 for too large; never logged as a policy decision)."""

    def __init__(self, field: str, message: str, *, status: int = 400):
        super().__init__(field, message)
        self.status = status


def body_limit(max_model_len: int | None, configured: int | None = None) -> int:
    """The body cap in bytes: ``configured`` (``VLLM_STEER_MAX_BODY_BYTES``) if given, else
    :data:`BODY_BYTES_PER_TOKEN` per token of the model's context, within
    [:data:`MIN_BODY_BYTES`, :data:`MAX_BODY_BYTES`]; :data:`MAX_BODY_BYTES` when the context is unknown."""
    if configured is not None:
        return configured
    if max_model_len is None:
        return MAX_BODY_BYTES
    return min(MAX_BODY_BYTES, max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len))


def _too_large(limit: int) -> BadBody:
    return BadBody("body", f"larger than {limit} bytes, the server's limit for a request body", status=413)


def declared_length(headers: Any) -> int | None:
    """The ``Content-Length`` a request declares (``headers``: a mapping, e.g. starlette's ``Headers``), if
    it is a plain non-negative integer; anything else is left to the server and to :func:`read_body`'s count."""
    value = headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None


async def read_body(receive: Receive, limit: int, declared: int | None = None) -> bytes:
    """The whole body, at most ``limit`` bytes (else :class:`BadBody`, status 413). With ``declared`` (the
    request's ``Content-Length``, :func:`declared_length`) over the limit, refuses before reading anything.
    A client that disconnects: :class:`ConnectionAbortedError`."""
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def parse_body_async(raw: bytes) -> dict[str, Any]:
    """:func:`parse_body` off the event loop for a body over :data:`INLINE_PARSE_BYTES` (a multi-megabyte
    body takes tens of milliseconds to parse and check), inline for a smaller one (cheaper than a thread hop).

    One parsing thread for the whole process, not one per body: parsing holds the GIL, so more threads
    would only crowd out the event loop's thread (it waits its turn behind each of them). With one, the
    loop gets the GIL back every switch interval (5 ms) wherever the parser runs Python code (the
    duplicate-key hook runs once per JSON object); a single long C call (decoding, scanning a long array
    of numbers) still holds it throughout, which the body cap bounds.
    """
    if len(raw) <= INLINE_PARSE_BYTES:
        return parse_body(raw)
    return await asyncio.get_running_loop().run_in_executor(_PARSER, parse_body, raw)


_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-steer-body")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadBody(key, "appears twice in the JSON object; send each field once")
        seen[key] = value
    return seen


_TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels"


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, strictly: :class:`BadBody` names what to fix (400)."""
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except BadBody:  # a duplicate key, named
        raise
    except RecursionError:  # the parser's own guard (~1000 levels): before the walk below could overflow
        raise BadBody("body", _TOO_DEEP) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBody("body", f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadBody("body", "must be a JSON object")
    if _too_deep(raw, body):
        raise BadBody("body", _TOO_DEEP)
    # One encoding (C speed) says whether any text is broken, and only then the walk finds where.
    if _may_hold_surrogates(raw) and not _encodable(json.dumps(body, ensure_ascii=False)):
        broken = _first_broken_text(body)
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


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
"""A ``\\uD800``-``\\uDFFF`` escape (also either half of an escaped emoji, which pair up)."""


def _may_hold_surrogates(raw: bytes) -> bool:
    """Whether a lone surrogate could be in the parsed body: only from a surrogate escape, or from surrogate
    bytes (the parser decodes UTF-8 with ``surrogatepass``; they start with 0xED, as do some Hangul), or in a
    body in UTF-16 or UTF-32, which the parser also reads and which always has a NUL byte (``{`` is ``7B 00``)."""
    return _SURROGATE_ESCAPE.search(raw) is not None or b"\xed" in raw or b"\x00" in raw


_KEEP_SHAPE = bytes(b for b in range(256) if b not in b'"[]{}')
"""Deleted by ``translate``: every byte but quotes and brackets."""
_OPEN_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_BRACKET_RUN = re.compile(rb"\[+|\]+")


def _too_deep(raw: bytes, body: Any) -> bool:
    """Whether valid JSON ``raw`` (parsed: ``body``) nests arrays and objects deeper than :data:`MAX_JSON_DEPTH`
    (the body itself is level 1). No recursion, and for UTF-8 at the speed of bytes operations.

    The brackets outside strings, as one kind (the parser checked that they match), are the shape of the
    nesting; each round of deleting ``[]`` removes the innermost level. Once the rounds stop paying off,
    one pass over the runs of brackets that are left finds the deepest point.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # most bodies: not even that many brackets
        return False
    if b"\x00" in raw:  # UTF-16/32: brackets and quotes are not single bytes; walk the parsed value
        return _depth_exceeds(body)
    # Backslashes occur only in strings, as escapes, paired from the left: drop the escaped backslashes,
    # then the escaped quotes; every quote left delimits a string, so every other piece is outside them.
    quotes_and_brackets = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _KEEP_SHAPE)
    shape = b"".join(quotes_and_brackets.split(b'"')[::2]).translate(_OPEN_AS_SQUARE)
    removed = 0
    while shape and removed < MAX_JSON_DEPTH:
        inner = shape.replace(b"[]", b"")
        removed += 1
        shrunk = len(shape) - len(inner) > len(shape) // 4
        shape = inner
        if not shrunk:
            break
    depth = removed
    for run in _BRACKET_RUN.findall(shape):
        depth += len(run) if run[0] == 0x5B else -len(run)
        if depth > MAX_JSON_DEPTH:
            return True
    return depth > MAX_JSON_DEPTH


def _depth_exceeds(body: Any) -> bool:
    """:func:`_too_deep` on the parsed value: one level of containers at a time."""
    level = [body]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


_Where = tuple[Any, ...]
"""Where a value sits, built only when needed: ``()`` for the body, ``(parent, key_or_index)`` below it."""


def _first_broken_text(body: dict[str, Any]) -> str | None:
    """The path of the first key or string (in document order) that cannot be encoded as UTF-8, if any.

    Iterative depth-first (no recursion, whatever the nesting). A key that cannot be encoded names its
    object's path (``""`` at the top: the caller says ``body``).
    """
    stack: list[tuple[Any, _Where]] = [(body, ())]
    while stack:
        item, where = stack.pop()
        if item is _BROKEN_KEY:  # in its place in document order: a key of the object at ``where``
            return _path(where) or "body"
        if isinstance(item, str):
            if not _encodable(item):
                return _path(where)
            continue
        if isinstance(item, list):
            for index in range(len(item) - 1, -1, -1):
                if isinstance(item[index], _TEXTUAL):
                    stack.append((item[index], (where, index)))
            continue
        children: list[tuple[Any, _Where]] = []
        for key, child in item.items():
            if not _encodable(key):
                children.append((_BROKEN_KEY, where))
                break  # nothing after it in this object comes first
            if isinstance(child, _TEXTUAL):
                children.append((child, (where, key)))
        stack.extend(reversed(children))
    return None


_BROKEN_KEY = object()
_TEXTUAL = (str, dict, list)


def _path(where: _Where) -> str:
    """``messages[3].content`` for ``((((), "messages"), 3), "content")``."""
    parts: list[str] = []
    while where:
        where, step = where
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return "".join(reversed(parts)).removeprefix(".")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
