"""Why a request is refused, as named exceptions; `app.py` alone gives each its HTTP status."""

from __future__ import annotations


class RequestRefused(Exception):
    """A request that gets an answer other than the file."""


class BadRequest(RequestRefused):
    """Malformed request target: bad percent-encoding, not UTF-8, control characters."""


class NotFound(RequestRefused):
    """No live file of that name, or a path no file can have."""


class MethodNotAllowed(RequestRefused):
    """Anything but GET and HEAD (and PURGE when PURGE_ALLOW is set)."""


class URITooLong(RequestRefused):
    """A path longer than any stored name may be."""


class PreconditionFailed(RequestRefused):
    """If-Match or If-Unmodified-Since does not hold (RFC 9110 §13.1.1, §13.1.4)."""


class Forbidden(RequestRefused):
    """A PURGE from an address outside PURGE_ALLOW."""
