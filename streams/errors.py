"""Errors raised by the streams package.

Class tree::

    FreshrecError
    ├── InvalidEvent          an event failed validation (carries ``reason``)
    ├── BrokerError           the broker could not be started or reached
    ├── StoreError            a state store could not be opened or read
    └── StateMismatch         local state does not belong to the broker's log
                              (e.g. the memory-only broker restarted empty)
"""

from __future__ import annotations

__all__ = ["FreshrecError", "InvalidEvent", "BrokerError", "StoreError", "StateMismatch"]


class FreshrecError(Exception):
    """Base class of every freshrec error."""


class InvalidEvent(FreshrecError):
    """An event failed validation. ``reason`` is machine-readable, ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BrokerError(FreshrecError):
    """The broker could not be started, reached or configured."""


class StoreError(FreshrecError):
    """A state store could not be opened, read or written."""


class StateMismatch(FreshrecError):
    """Local state was built from a log the broker no longer has."""
