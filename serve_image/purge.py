"""Telling every cache that a file changed: `PURGE /<name>` to each of PURGE_URLS.

A write (store, delete, wildcard delete, purge) has committed before its
names get here, so a cache that drops the file and asks again reads the new
version. Each purge goes to every URL at once; the names of a batch go to
one URL at most PER_URL at a time, over pooled keep-alive connections. One
request, with its retries, gets at most PURGE_TIMEOUT seconds: connection
errors, time-outs and 5xx/429 answers are retried with the project's
backoff; any other answer is final. When a URL fails one file for good, the
rest of that batch is not sent there (its failure is counted, not waited
out again), so a target that is down costs one PURGE_TIMEOUT per batch.

A failure is logged and reported, never raised: the write it follows has
happened and stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from urllib.parse import quote

import httpx

from serve_image.backoff import Backoff
from serve_image.settings import Settings
from serve_image.storage import name_hash

logger = logging.getLogger("serve_image.purge")

# PURGE requests in flight to one URL.
PER_URL = 8
# Names sent as one batch by the queue behind ClusterFiles.
BATCH = 1000
# Waits between tries of one request: short, so a blip costs little.
RETRY_FIRST = 0.1
RETRY_CAP = 1.0
# RFC 3986 §3.3: a path segment keeps unreserved characters, sub-delims, ":"
# and "@" as they are; every other byte is percent-encoded (upper-case hex,
# §6.2.2.1), as browsers send a name with a space or non-ASCII letters.
_PATH_SAFE = "/!$&'()*+,;=:@~"


def purge_path(name: str) -> str:
    """The request path a stored name is served at: `/var/site/storage/images/a%20b.jpg`."""
    return "/" + quote(name, safe=_PATH_SAFE)


@dataclasses.dataclass
class Failure:
    """One URL's failures in a report: how many files, and the first reason."""

    files: int
    reason: str


@dataclasses.dataclass
class PurgeReport:
    """What a round of purges did: files sent, URLs, failures by URL."""

    files: int = 0
    urls: int = 0
    failures: dict[str, Failure] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, other: PurgeReport) -> None:
        self.files += other.files
        self.urls = max(self.urls, other.urls)
        for url, failure in other.failures.items():
            mine = self.failures.setdefault(url, Failure(0, failure.reason))
            mine.files += failure.files

    def summary(self) -> str:
        """One line: `PURGE sent for 3 file(s) to 2 URL(s): all answered`, or what failed."""
        line = f"PURGE sent for {self.files} file(s) to {self.urls} URL(s)"
        if not self.failures:
            return f"{line}: all answered"
        failed = "; ".join(f"{url} failed for {f.files} ({f.reason})"
                           for url, f in self.failures.items())
        return f"{line}: {failed}"


def _reason(error: httpx.HTTPError | TimeoutError) -> str:
    if isinstance(error, TimeoutError | httpx.TimeoutException):
        return "no answer in time"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"


class Purger:
    """Sends PURGE for stored names to a site's PURGE_URLS."""

    def __init__(
        self, urls: Sequence[str], timeout: float, key_header: str | None = None,
    ) -> None:
        self.urls = tuple(urls)
        self.timeout = timeout
        self.key_header = key_header
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def for_site(cls, settings: Settings) -> Purger | None:
        """The site's purger, or None when PURGE_URLS is empty."""
        if not settings.purge_urls:
            return None
        return cls(settings.purge_urls, settings.purge_timeout, settings.surrogate_key_header)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            connections = PER_URL * len(self.urls)
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=connections,
                                    max_keepalive_connections=connections),
                timeout=self.timeout,
                # The caches are named in the site file: no proxy taken from
                # the environment, no redirect followed.
                trust_env=False, follow_redirects=False,
                headers={"user-agent": "serve-image"},
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, names: Iterable[str]) -> PurgeReport:
        """PURGE every name at every URL; never raises for a cache that fails."""
        unique = list(dict.fromkeys(names))
        report = PurgeReport(files=len(unique), urls=len(self.urls))
        if not unique:
            return report
        results = await asyncio.gather(*(self._send_to(url, unique) for url in self.urls))
        for url, (failed, reason) in zip(self.urls, results, strict=True):
            if failed:
                report.failures[url] = Failure(failed, reason or "")
                logger.warning("PURGE at %s failed for %d of %d file(s): %s",
                               url, failed, len(unique), reason)
        return report

    async def _send_to(self, url: str, names: list[str]) -> tuple[int, str | None]:
        """(files that failed, first reason) for one URL."""
        pending = iter(names)
        failed = 0
        first: str | None = None

        async def worker() -> None:
            nonlocal failed, first
            for name in pending:
                if first is not None:
                    failed += 1  # the URL failed one file for good: not waited out again
                    continue
                reason = await self._purge_one(url, name)
                if reason is not None:
                    failed += 1
                    first = first or reason

        await asyncio.gather(*(worker() for _ in range(min(PER_URL, len(names)))))
        return failed, first

    async def _purge_one(self, url: str, name: str) -> str | None:
        """None once the URL answered 2xx; else why not, after the retries PURGE_TIMEOUT allows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = Backoff(RETRY_FIRST, RETRY_CAP)
        headers = {self.key_header: name_hash(name)} if self.key_header else None
        target = url + purge_path(name)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    answer = await self._http().request("PURGE", target, headers=headers)
                if answer.is_success:
                    return None
                reason = f"{answer.status_code} {answer.reason_phrase}"
                # Another answer would not change by asking again.
                if answer.status_code < 500 and answer.status_code != 429:
                    return reason
            except (httpx.HTTPError, TimeoutError) as e:
                reason = _reason(e)
            if loop.time() + backoff.delay >= deadline:
                return reason
            await backoff.wait()


class PurgeQueue:
    """Names written by ClusterFiles, purged in batches by a background task.

    `add` never waits, so a write is never slowed by a cache; `flush` waits
    for what was added so far and returns the report since the last flush.
    """

    def __init__(self, purger: Purger) -> None:
        self.purger = purger
        self._names: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._report = PurgeReport(urls=len(purger.urls))

    @classmethod
    def for_site(cls, settings: Settings) -> PurgeQueue | None:
        purger = Purger.for_site(settings)
        return None if purger is None else cls(purger)

    def add(self, names: Iterable[str]) -> None:
        self._names.extend(names)
        if self._names and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._names:
            batch, self._names = self._names[:BATCH], self._names[BATCH:]
            self._report.add(await self.purger.send(batch))

    async def flush(self) -> PurgeReport:
        """Wait until every name added is purged (or failed); the report since the last flush."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        report, self._report = self._report, PurgeReport(urls=len(self.purger.urls))
        return report

    async def close(self) -> PurgeReport:
        try:
            return await self.flush()
        finally:
            await self.purger.close()
