"""Open client connections: the bound on them, and what the HTTP server tells the app.

Every connection holds a file descriptor, and a process that runs out of them
can accept no one: at the limit, new clients are reset or left waiting. So:

- at start-up serve-image raises its soft RLIMIT_NOFILE to the hard limit
  (`raise_open_files_limit`; a systemd unit sets the hard one, LimitNOFILE);
- MAX_CONNECTIONS bounds the connections of each worker process; by default
  it is three quarters of the open-file limit, the last quarter being for the
  database pool, files, and the connections over the bound, which are still
  accepted so that they get a 503 rather than a reset (`connection_limit`);
- servers that can count connections (uvicorn, servers/uvicorn.py) report
  each one opened and closed here, and each invalid request; app.py answers
  503 while the count is over the bound, and the metrics show both.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Protocol

# When the hard limit is "unlimited", the kernel still refuses a soft limit
# above fs.nr_open (1,048,576 by default on Linux).
NR_OPEN_FALLBACK = 1024 * 1024
# A floor for tiny limits: a server that accepts nobody is no server.
MIN_CONNECTIONS = 16


class ConnectionObserver(Protocol):
    def connections_open(self, count: int) -> None: ...

    def bad_request(self) -> None: ...


@dataclass
class Connections:
    """This process's client connections, as the HTTP server reports them."""

    open: int = 0
    observers: list[ConnectionObserver] = field(default_factory=list)

    def opened(self) -> None:
        self.open += 1
        for o in self.observers:
            o.connections_open(self.open)

    def closed(self) -> None:
        self.open -= 1
        for o in self.observers:
            o.connections_open(self.open)

    def bad_request(self) -> None:
        for o in self.observers:
            o.bad_request()


# One per process: the server's protocol and the app are built apart from
# each other (uvicorn builds a protocol per connection, the app once).
CONNECTIONS = Connections()


def open_files_limit() -> int:
    """This process's soft limit on open files."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NR_OPEN_FALLBACK if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard one; the new soft limit.

    A systemd service starts with a soft limit of 1,024 whatever its hard
    limit: a few hundred idle sockets would otherwise take the node down.
    Worker processes inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN_FALLBACK if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # e.g. above fs.nr_open: keep the soft limit we have
    return open_files_limit()


def connection_limit(configured: int | None) -> int:
    """MAX_CONNECTIONS of one worker: the site's, or derived from the open-file limit."""
    if configured is not None:
        return configured
    return max(MIN_CONNECTIONS, open_files_limit() * 3 // 4)
