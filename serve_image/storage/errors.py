"""What can go wrong below the HTTP layer: domain errors, with no status and no exit code.

`app.py` turns them into responses and `cli.py` into exit codes; every
message is for logs and never holds the database password.
"""

from __future__ import annotations


class DriverMissing(Exception):
    """The Python driver a site needs is not installed; the message says what to install.

    Not a StorageError: no retry or later request can mend it.
    """


class StorageError(Exception):
    """Something the storage could not do."""


class DatabaseUnavailable(StorageError):
    """The database cannot answer now (down, unreachable, pool exhausted, too slow)."""


class StatementFailed(StorageError):
    """The database refused one statement (a value too long, a constraint): not an outage.

    The connection is fine and stays in use; an import reports that file and
    goes on. On the request path it is our bug.
    """


class SizeMismatch(StorageError):
    """The bytes given to a store do not add up to the size it was told: nothing was stored.

    A source that changed while it was read (`copy` reports that file and
    goes on); the store's transaction is rolled back, its temporary file removed.
    """


class FileUnavailable(StorageError):
    """A file's row is there but its bytes cannot be read now (a write in progress,
    a shared mount that is slow or failing): try again shortly.

    `in_progress`: most likely a write under way (eZ stores the row, then
    copies the file), over in a moment; otherwise the storage is failing.
    """

    def __init__(self, message: str, *, in_progress: bool = False) -> None:
        super().__init__(message)
        self.in_progress = in_progress


class StreamAborted(StorageError):
    """The file changed, vanished or is broken after its headers were sent.

    A 200 that ends with wrong bytes is worse than a broken transfer: the
    response is cut off and the client sees an incomplete body.
    """
