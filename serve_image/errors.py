"""Named exceptions of the request path, turned into responses in `app.py` alone."""

from __future__ import annotations


class HTTPError(Exception):
    """An answer other than the file: carries its status and a short plain text."""

    status = 500
    text = "Internal Server Error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.text)
        self.detail = detail


class BadRequest(HTTPError):
    status = 400
    text = "Bad Request"


class NotFound(HTTPError):
    status = 404
    text = "Not Found"


class MethodNotAllowed(HTTPError):
    status = 405
    text = "Method Not Allowed"


class URITooLong(HTTPError):
    status = 414
    text = "URI Too Long"


class DatabaseUnavailable(HTTPError):
    """The database cannot answer now (down, unreachable, pool exhausted).

    The message is for logs and names no password; the client sees only the
    status, `Retry-After` and a short text.
    """

    status = 503
    text = "Service Unavailable"


class StatementFailed(HTTPError):
    """The database refused one statement (a value too long, a constraint): not an outage.

    The connection is fine and stays in use; an import reports that file and
    goes on. On the request path it is our bug, hence a plain 500.
    """

    status = 500
    text = "Internal Server Error"


class StreamAborted(Exception):
    """The file changed, vanished or is broken after its headers were sent.

    A 200 that ends with wrong bytes is worse than a broken transfer: the
    response is cut off and the client sees an incomplete body.
    """


class PreconditionFailed(HTTPError):
    status = 412
    text = "Precondition Failed"
