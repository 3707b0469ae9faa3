"""Errors of the serving package; each knows its HTTP status.

::

    FreshrecError (streams.errors)
    └── ServingError            500, the base: one handler maps every subclass
        ├── BadRequest          422, a parameter that validation let through but is wrong
        └── NotReady            503, the replicas have not caught up yet

Unexpected exceptions become a 500 carrying only an ``error_id`` that is also logged with
the traceback; ``str(exc)`` of an unexpected error never reaches a client.
"""

from __future__ import annotations

from streams.errors import FreshrecError

__all__ = ["ServingError", "BadRequest", "NotReady"]


class ServingError(FreshrecError):
    """Base class of serving errors (HTTP 500 unless a subclass says otherwise)."""

    http_status = 500
    code = "internal"


class BadRequest(ServingError):
    """A request parameter is invalid (HTTP 422)."""

    http_status = 422
    code = "invalid_request"


class NotReady(ServingError):
    """The process cannot answer this yet (HTTP 503)."""

    http_status = 503
    code = "not_ready"
