"""What the tenant policy refuses (:class:`PolicyError`, with its HTTP status) and what a tenants file gets
wrong (:class:`TenantsFileError`). Both name the field to fix (:class:`~vllm_steer.core.errors.SteerError`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_steer.core.errors import SteerError

__all__ = ["PolicyError", "TenantsFileError", "malformed", "above_tier"]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
}


class PolicyError(SteerError):
    """A request the policy refuses; ``status`` is the HTTP status, ``field`` the request key to fix.

    400 malformed or invalid for the profile whoever sends it, 401 missing or unknown key, 403 valid but
    above the caller's tier, 429 over the tier's concurrency, 500 when the tier's own setting cannot be applied.
    """

    def __init__(self, status: int, field: str, message: str):
        super().__init__(field, message)
        self.status = status
        self.args = (f"{status} {field}: {message}",)

    @property
    def error_type(self) -> str:
        return _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def to_openai(self) -> dict[str, Any]:
        """The body of an OpenAI-style error response."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.field, "code": self.status}}


class TenantsFileError(SteerError):
    """A tenants file that cannot be used; the message names the file (``path``) and the field path."""

    def __init__(self, path: Path | str, field: str, message: str):
        super().__init__(field, message, path=path)


def malformed(field: str, message: str) -> PolicyError:
    """400: the request is malformed, or invalid for its profile, whoever sends it."""
    return PolicyError(400, field, message)


def above_tier(field: str, message: str) -> PolicyError:
    """403: valid, but not for the caller's tier."""
    return PolicyError(403, field, message)
