"""The benchmark's pure parts: wrk's output in, figures, ratios and tables out."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1024 * 1024
WRK_MARK = "WRK_JSON "

class WrkOutputError(ValueError):
    """wrk did not print the line our Lua script's done() writes."""


@dataclass(frozen=True)
class WrkRun:
    """One wrk run, as printed by bench/random_paths.lua's done()."""

    requests: int
    bytes: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float


def parse_wrk(stdout: str) -> WrkRun:
    """The WRK_JSON line of a wrk run; WrkOutputError if there is none."""
    for line in stdout.splitlines():
        if line.startswith(WRK_MARK):
            data = json.loads(line[len(WRK_MARK):])
            return WrkRun(
                requests=int(data["requests"]),
                bytes=int(data["bytes"]),
                duration_s=data["duration_us"] / 1e6,
                errors=sum(int(v) for v in data["errors"].values()),
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
            )
    raise WrkOutputError(f"no {WRK_MARK.strip()} line in wrk's output: {stdout[-500:]!r}")


@dataclass(frozen=True)
class Usage:
    """Counters read from a system: the difference of two, around a run, is what it cost.

    CPU seconds of the system's processes and of its database server (None:
    not on this machine, or SQLite, whose reads are the worker's own), and
    its hot cache's lookups (None: no cache, or no metrics to read them from).
    """

    worker_cpu_s: float
    db_cpu_s: float | None = None
    cache_hits: int | None = None
    cache_lookups: int | None = None

    def __sub__(self, before: Usage) -> Usage:
        def minus(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a - b

        hits = minus(self.cache_hits, before.cache_hits)
        lookups = minus(self.cache_lookups, before.cache_lookups)
        return Usage(
            self.worker_cpu_s - before.worker_cpu_s, minus(self.db_cpu_s, before.db_cpu_s),
            None if hits is None else int(hits), None if lookups is None else int(lookups),
        )


@dataclass
class Figures:
    """One system in one scenario, over all its rounds."""

    runs: list[WrkRun] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)  # peak RSS of each worker, any round
    usage: list[Usage] = field(default_factory=list)  # what each run cost, when it was read

    def summary(self) -> dict[str, Any]:
        seconds = sum(r.duration_s for r in self.runs)
        return {
            "req_s": round(sum(r.requests for r in self.runs) / seconds, 1) if seconds else 0.0,
            "mb_s": round(sum(r.bytes for r in self.runs) / MIB / seconds, 2) if seconds else 0.0,
            # Per-round percentiles, averaged: wrk gives no mergeable histogram.
            "p50_ms": round(statistics.fmean(r.p50_ms for r in self.runs), 2),
            "p99_ms": round(statistics.fmean(r.p99_ms for r in self.runs), 2),
            "errors": sum(r.errors for r in self.runs),
            "rounds": len(self.runs),
            "peak_rss_mib_per_worker": round(max(self.rss_mib), 1) if self.rss_mib else None,
            **self._costs(),
        }

    def _costs(self) -> dict[str, Any]:
        """CPU per MiB sent and per request, and the hot cache's hit ratio, over the runs."""
        mib = sum(r.bytes for r in self.runs) / MIB
        requests = sum(r.requests for r in self.runs)
        out: dict[str, Any] = {}
        for who in ("worker", "db"):
            spent = [getattr(u, f"{who}_cpu_s") for u in self.usage]
            total = None if not spent or None in spent else sum(spent)
            out[f"{who}_cpu_ms_per_mib"] = (
                round(total * 1000 / mib, 3) if total is not None and mib else None)
            out[f"{who}_cpu_us_per_req"] = (
                round(total * 1e6 / requests, 1) if total is not None and requests else None)
        lookups = [u.cache_lookups for u in self.usage]
        known = bool(lookups) and None not in lookups
        out["hit_ratio"] = ratio(sum(u.cache_hits or 0 for u in self.usage),
                                 sum(n or 0 for n in lookups)) if known else None
        return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, rounded; None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def is_ceiling(name: str) -> bool:
    """One half of serve-image measured alone: `http-only` or `db-only-<backend>`."""
    return name == "http-only" or name.startswith("db-only-")


def ratios(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]],
           figures: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """serve-image / nginx and serve-image / naive (same backend), per system and scenario.

    `summaries` is scenario -> system -> Figures.summary(), `figures` scenario
    -> the figure its ratios are made of ("req_s" or "mb_s"). serve-image
    systems are named `serve-image-<backend>-...`, the baselines `nginx`
    and `naive-<backend>`. The two ceilings get their share of nginx too:
    `http-only` (uvicorn sending the same responses from memory) and
    `db-only-<backend>` (serve-image's database reads without HTTP, `large`
    only).
    """
    out: dict[str, dict[str, Any]] = {}
    for scenario, systems in summaries.items():
        figure = figures[scenario]
        nginx = systems.get("nginx", {}).get(figure)
        for name, s in systems.items():
            if is_ceiling(name):
                out.setdefault(scenario, {})[name] = {
                    "figure": figure, "vs_nginx": ratio(s.get(figure), nginx), "vs_naive": None,
                }
            if not name.startswith("serve-image-"):
                continue
            backend = name.split("-")[2]
            naive = systems.get(f"naive-{backend}", {}).get(figure)
            out.setdefault(scenario, {})[name] = {
                "figure": figure,
                "vs_nginx": ratio(s.get(figure), nginx),
                "vs_naive": ratio(s.get(figure), naive),
            }
    return out


@dataclass(frozen=True)
class Target:
    text: str
    value: float | None
    limit: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value < self.limit


def targets(
    summaries: Mapping[str, Mapping[str, Mapping[str, Any]]],
    rat: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> list[Target]:
    """The issue's targets, each with the figure measured for it (None if not run)."""
    def r(scenario: str, system: str, key: str) -> float | None:
        value = rat.get(scenario, {}).get(system, {}).get(key)
        return None if value is None else float(value)

    out = [
        Target("small, MariaDB 1 worker / naive >= 4",
               r("small", "serve-image-mysql-1w", "vs_naive"), 4),
        Target("small, MariaDB 1 worker / nginx >= 0.08",
               r("small", "serve-image-mysql-1w", "vs_nginx"), 0.08),
        Target("small, PostgreSQL 1 worker / naive >= 3",
               r("small", "serve-image-pgsql-1w", "vs_naive"), 3),
        Target("small, SQLite 1 worker / naive >= 3",
               r("small", "serve-image-sqlite-1w", "vs_naive"), 3),
        Target("small, MariaDB 1 worker + hot cache / nginx >= 0.25",
               r("small", "serve-image-mysql-1w-cache", "vs_nginx"), 0.25),
        Target("small, MariaDB 1 worker + hot cache / nginx >= 0.4",
               r("small", "serve-image-mysql-1w-cache", "vs_nginx"), 0.4),
        Target("not_modified, MariaDB 1 worker + hot cache / nginx >= 0.4",
               r("not_modified", "serve-image-mysql-1w-cache", "vs_nginx"), 0.4),
        Target("5 MiB MB/s, MariaDB 1 worker / naive >= 1.3",
               r("large", "serve-image-mysql-1w", "vs_naive"), 1.3),
        Target("5 MiB MB/s, PostgreSQL 1 worker / naive >= 1.3",
               r("large", "serve-image-pgsql-1w", "vs_naive"), 1.3),
    ]
    for system in sorted(s for s in rat.get("large", {})
                         if s.startswith("serve-image-") and "-dfs" not in s):
        out.append(Target(f"5 MiB MB/s, {system} / nginx >= 0.4",
                          r("large", system, "vs_nginx"), 0.4))
    # The DFS layout: the bytes on a mount (issue 13).
    small = summaries.get("small", {})
    for backend, text in (("mysql", "MariaDB"), ("pgsql", "PostgreSQL")):
        out += [
            Target(f"small, {text} DFS 1 worker / the chunk layout's >= 1",
                   ratio(small.get(f"serve-image-{backend}-dfs-1w", {}).get("req_s"),
                         small.get(f"serve-image-{backend}-1w", {}).get("req_s")), 1),
            Target(f"5 MiB MB/s, {text} DFS 1 worker / nginx >= 0.6",
                   r("large", f"serve-image-{backend}-dfs-1w", "vs_nginx"), 0.6),
            Target(f"5 MiB MB/s, {text} DFS with offload through nginx / nginx >= 0.9",
                   r("large", f"serve-image-{backend}-dfs-offload", "vs_nginx"), 0.9),
        ]
    for system in sorted(s for s in rat.get("realistic", {})
                         if s.startswith("serve-image-") and s.endswith("-cache")):
        out.append(Target(f"realistic req/s, {system} / nginx >= 0.25",
                          r("realistic", system, "vs_nginx"), 0.25))
    slow = summaries.get("slow_readers", {})
    small = summaries.get("small", {})
    for system in sorted(s for s in slow if s.startswith("serve-image-")):
        rss = slow[system].get("peak_rss_mib_per_worker")
        out.append(Target(f"64 slow readers, {system}: peak RSS per worker (MiB) < 150",
                          None if rss is None else float(rss), 150, higher_is_better=False))
        p99 = ratio(slow[system].get("p99_ms"), small.get(system, {}).get("p99_ms"))
        out.append(Target(f"64 slow readers, {system}: 10 KiB p99 / p99 without them < 5",
                          p99, 5, higher_is_better=False))
    return out


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


# The columns of a scenario's table: heading, summary key (None: a ratio).
COLUMNS = (
    ("req/s", "req_s"), ("MB/s", "mb_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
    ("peak RSS/worker MiB", "peak_rss_mib_per_worker"), ("errors", "errors"),
    ("DB CPU ms/MiB", "db_cpu_ms_per_mib"), ("worker CPU ms/MiB", "worker_cpu_ms_per_mib"),
    ("DB CPU µs/req", "db_cpu_us_per_req"), ("worker CPU µs/req", "worker_cpu_us_per_req"),
    ("hit ratio", "hit_ratio"),
)


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables: the data, figures per scenario, then the targets."""
    lines = [f"# serve-image benchmark, {report['started']}", "", f"Command: `{report['command']}`",
             "", f"{report['machine']}", ""]
    for name, notes in report.get("data", {}).items():
        lines.append(f"- data set `{name}`: " + "; ".join(
            f"{k} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in notes.items()))
    lines += ["", "CPU is read from /proc around each run: the system's processes (worker), "
              "its database server's (DB: the whole server, any client), per MiB wrk read "
              "and per request.", ""]
    for scenario, systems in report["summaries"].items():
        rat = report["ratios"].get(scenario, {})
        # A column no system has a figure for (the hit ratio, mostly) is left out.
        columns = [(h, k) for h, k in COLUMNS
                   if any(s.get(k) is not None for s in systems.values())]
        lines += [f"## {scenario}: {report['scenarios'][scenario]}", "",
                  "| system | " + " | ".join(h for h, _ in columns) + " | / nginx | / naive |",
                  "| --- |" + " ---: |" * (len(columns) + 2)]
        for name, s in systems.items():
            q = rat.get(name, {})
            cells = [_cell(s.get(k)) for _, k in columns]
            cells += [_cell(q.get("vs_nginx")), _cell(q.get("vs_naive"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "| --- | ---: | :---: |"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['text']} | {_cell(t['value'])} | {met} |")
    return "\n".join(lines) + "\n"


def target_dicts(ts: Iterable[Target]) -> list[dict[str, Any]]:
    return [{**asdict(t), "met": t.met} for t in ts]


def chart(report: Mapping[str, Any], path: str) -> None:
    """A PNG with one bar chart per scenario (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("small", "req_s", "10 KiB GETs: req/s"),
              ("not_modified", "req_s", "If-None-Match (304): req/s"),
              ("large", "mb_s", "5 MiB file: MB/s"),
              ("slow_readers", "p99_ms", "10 KiB p99 ms with 64 slow readers"),
              ("slow_readers", "peak_rss_mib_per_worker", "peak RSS per worker, MiB"),
              ("realistic", "req_s", "realistic workload (Zipf, eZ alias sizes): req/s")]
    panels = [p for p in panels if p[0] in report["summaries"]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (scenario, key, title) in zip(axes[:, 0], panels, strict=True):
        systems = report["summaries"][scenario]
        names = list(systems)
        values = [systems[n][key] or 0 for n in names]
        colours = ["#888888" if n == "nginx" else "#c44e52" if n.startswith("naive")
                   else "#bbbbbb" if is_ceiling(n)
                   else "#4c72b0" for n in names]
        ax.barh(names, values, color=colours)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
