"""The realistic workload: files sized as eZ's image aliases, asked for with Zipf popularity.

- **Files**: 10,000, in four size classes, as eZ's image aliases make them:
  60 % thumbnails of 2-8 KiB, 30 % of 20-60 KiB, 9 % of 100-400 KiB and 1 %
  originals of 1-5 MiB; sizes uniform within a class.
- **Popularity**: the file of rank k (0 = most asked for) is asked for with
  probability proportional to 1 / (k + 1) ** s, s = 1 (Zipf). Size does not
  decide popularity: the ranks are dealt to the classes so that every prefix
  of the ranking holds the four classes in their shares, so the most popular
  files are not, by the luck of a shuffle, all originals or all thumbnails.
- **Requests**: a list of 200,000 paths drawn from that distribution with a
  fixed seed; wrk walks it in order (bench/random_paths.lua, `seq`), so
  every system gets the same requests.

Everything is made from the seed, so the files are written once and kept
under bench/work/ (named by VERSION and the file count), and so is the
SQLite database holding them: the next run reuses both.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
FILE_COUNT = 10_000
SEQUENCE_LENGTH = 200_000
ZIPF_S = 1.0
SEED = 14
# Bump when what is generated changes: the copies under bench/work/ are named by it.
VERSION = 1
MTIME = 1_700_000_000
VAR = "var/bench/storage/images/realistic"


@dataclass(frozen=True)
class SizeClass:
    share: float
    smallest: int
    largest: int
    alias: str  # in the file's name, as eZ names an alias's file


SIZE_CLASSES = (
    SizeClass(0.60, 2 * KiB, 8 * KiB, "thumbnail"),
    SizeClass(0.30, 20 * KiB, 60 * KiB, "medium"),
    SizeClass(0.09, 100 * KiB, 400 * KiB, "large"),
    SizeClass(0.01, 1 * MiB, 5 * MiB, "original"),
)


@dataclass(frozen=True)
class RealisticFiles:
    root: Path  # the document root: root / name is each file
    names: list[str]  # by rank, most asked for first
    sizes: list[int]
    sequence: Path  # the request list, one "/name" per line
    mean_request_bytes: float  # body bytes per request of the list


def classes_by_rank(count: int) -> list[SizeClass]:
    """The size class of each rank: at every rank, the class furthest below its share."""
    dealt = [0] * len(SIZE_CLASSES)
    out = []
    for rank in range(count):
        lag = [(rank + 1) * c.share - n for c, n in zip(SIZE_CLASSES, dealt, strict=True)]
        pick = lag.index(max(lag))
        dealt[pick] += 1
        out.append(SIZE_CLASSES[pick])
    return out


def plan(count: int = FILE_COUNT, seed: int = SEED) -> list[tuple[str, int]]:
    """(name, size) of every file, most popular first."""
    rnd = random.Random(seed)
    return [
        (f"{VAR}/{rank % 100:02d}/{rank:05d}-{c.alias}.jpg", rnd.randint(c.smallest, c.largest))
        for rank, c in enumerate(classes_by_rank(count))
    ]


def zipf_ranks(count: int, length: int, s: float = ZIPF_S, seed: int = SEED) -> list[int]:
    """`length` ranks in [0, count), rank k drawn with probability ∝ 1 / (k + 1) ** s."""
    cumulative = list(itertools.accumulate(1 / (k + 1) ** s for k in range(count)))
    total = cumulative[-1]
    rnd = random.Random(seed)
    # bisect over the cumulative weights is random.choices' own method, without
    # its float rounding at the very top end.
    return [min(bisect.bisect(cumulative, rnd.random() * total), count - 1)
            for _ in range(length)]


def materialise(work: Path, count: int = FILE_COUNT, length: int = SEQUENCE_LENGTH
                ) -> RealisticFiles:
    """The files and the request list under `work`, written unless a complete copy is there."""
    home = work / f"realistic-v{VERSION}-{count}"
    manifest = home / "manifest.json"
    files = plan(count)
    names = [n for n, _ in files]
    sizes = [s for _, s in files]
    if not manifest.is_file():
        # Written beside, then renamed: an interrupted run leaves no half copy.
        partial = work / f"{home.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        rnd = random.Random(SEED + 1)
        for name, size in files:
            path = partial / "root" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rnd.randbytes(size))
            os.utime(path, (MTIME, MTIME))
        ranks = zipf_ranks(count, length)
        (partial / "sequence.txt").write_text("".join(f"/{names[r]}\n" for r in ranks))
        mean = sum(sizes[r] for r in ranks) / len(ranks)
        (partial / "manifest.json").write_text(json.dumps({
            "version": VERSION, "files": count, "bytes": sum(sizes), "requests": length,
            "mean_request_bytes": round(mean, 1),
        }) + "\n")
        shutil.rmtree(home, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        partial.rename(home)
    # nginx's workers run as an unprivileged user and read the files.
    for d in (work, home, home / "root"):
        d.chmod(0o755)
    made = json.loads(manifest.read_text())
    return RealisticFiles(home / "root", names, sizes, home / "sequence.txt",
                          made["mean_request_bytes"])


def sqlite_path(files: RealisticFiles) -> Path:
    """Where the SQLite database holding the files is kept, beside them."""
    return files.root.parent / "sqlite.db"
