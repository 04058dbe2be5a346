"""One error base for everything a user can get wrong, and one way to name the field from pydantic.

Every refusal in the product names the thing to fix: a request key (``steer_angle``), a file and a
field path (``profile.json: defaults.angle``), a setting. :class:`SteerError` carries it as ``field``
(and ``path`` where a file is at fault); :func:`field_and_message` turns a pydantic error into it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

__all__ = ["SteerError", "field_and_message"]

_SUBFIELD = re.compile(r"[A-Za-z_][\w.\-*]*")


class SteerError(ValueError):
    """A refusal naming what to fix: ``field`` (a request key or a field path) and, for files, ``path``."""

    def __init__(self, field: str, message: str, path: Path | str | None = None):
        self.field = field
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {field}: {message}" if path is not None else f"{field}: {message}")


def field_and_message(
    err: ValidationError, *, default: str = "<root>", count_more: bool = False, depth: int | None = None
) -> tuple[str, str]:
    """The dotted field path and message of a pydantic error's first problem.

    A model validator that checks several fields at once names its field first (``"layers: ..."``);
    that name is appended to the location. With ``count_more``, the message says how many other
    problems there were. With ``depth``, the path keeps at most that many parts (``depth=1``: the
    top-level key, e.g. ``steer_layers`` for a bad item of it); a field name the message starts with
    then stays in the message when there is no room for it in the path.
    """
    errors = err.errors(include_input=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    if depth is not None:
        loc = loc[:depth]
    msg = first["msg"].removeprefix("Value error, ")
    sub, sep, rest = msg.partition(": ")
    if sep and _SUBFIELD.fullmatch(sub) and (depth is None or len(loc) < depth):
        loc.append(sub)
        msg = rest
    if count_more and len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ".".join(loc) or default, msg
