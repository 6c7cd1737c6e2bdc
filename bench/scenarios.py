"""The scenarios: what load each puts on every system of its data set.

A scenario is one entry of SCENARIOS: the data set whose systems it runs
(bench/datasets.py), the request list wrk takes from the stage, how many
connections, and any load around wrk's (the slow readers). Its `figure` is
what its ratios are made of. A new layout's scenarios are entries here over
a data set of their own: DFS, for one, would add `dfs_small` and `dfs_large`
over a `dfs` data set whose stage lists files of 10 KiB and 5 MiB on a
mount and runs serve-image with and without offload beside nginx serving
the mount.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench import load

if TYPE_CHECKING:
    from bench.datasets import Stage
    from bench.systems import System

SLOW_READERS = 64
LARGE_CONNECTIONS = 4  # the `large` scenario's, for wrk and db-only alike

Around = Callable[["System", "Stage"], AbstractAsyncContextManager[None]]


def nothing(system: System, stage: Stage) -> AbstractAsyncContextManager[None]:
    return nullcontext()


def slow_readers(system: System, stage: Stage) -> AbstractAsyncContextManager[None]:
    return load.slow_readers(system.port, stage.files["large"], SLOW_READERS)


@dataclass(frozen=True)
class Scenario:
    text: str  # what the report calls it
    figure: str  # what its ratios are made of: "req_s" or "mb_s"
    data: str  # the data set whose systems run it
    paths: str  # the stage's request list wrk takes (stage.paths[system][paths])
    connections: int
    inm: bool = False  # send each line's ETag as If-None-Match
    walk: bool = False  # walk the list in order (a drawn request list), not pick at random
    around: Around = nothing  # load running beside wrk's, started before the clock
    db_only: bool = False  # the db-only systems run it too (reading stage.files["large"][0])
    warmup: bool = False  # run its load once, unmeasured, on every system before the rounds
    default: bool = True  # part of a run without --scenarios


SCENARIOS: dict[str, Scenario] = {
    "small": Scenario("random 10 KiB GETs, 32 connections", "req_s", "standard", "small", 32),
    "not_modified": Scenario("random 10 KiB GETs with If-None-Match (304), 32 connections",
                             "req_s", "standard", "small", 32, inm=True),
    "large": Scenario("one 5 MiB file, 4 connections", "mb_s", "standard", "large",
                      LARGE_CONNECTIONS, db_only=True),
    "slow_readers": Scenario(
        f"random 10 KiB GETs, 32 connections, while {SLOW_READERS} slow readers fetch 5 MiB files",
        "req_s", "standard", "small", 32, around=slow_readers),
    "realistic": Scenario(
        "10,000 files sized as eZ's image aliases, Zipf popularity (s = 1), 32 connections",
        "req_s", "realistic", "zipf", 32, walk=True, warmup=True),
}
