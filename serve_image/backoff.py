"""Waiting out a storage that is briefly unavailable: one backoff rule for every command.

A deadlock, a failover or a restart lasts a moment, an outage longer: the
waits start short, so a blip costs little, and double up to a cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from serve_image.storage import DatabaseUnavailable

T = TypeVar("T")


class Backoff:
    """Growing waits between tries: `first`, then doubling, at most `cap` seconds."""

    def __init__(self, first: float = 0.5, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        """After a success: the next outage starts with short waits again."""
        self.delay = self.first


async def with_retry(fn: Callable[[], Awaitable[T]], tries: int = 4) -> T:
    """Run a database operation, tried again while the database is briefly unavailable.

    `tries` tries, 0.5 s apart and doubling (3.5 s in all by default), then
    the error goes up: an outage stops a one-off command.
    """
    backoff = Backoff(cap=float("inf"))
    for _ in range(tries - 1):
        try:
            return await fn()
        except DatabaseUnavailable:
            await backoff.wait()
    return await fn()
