"""The load benchmark: serve-image against nginx and the naive port, driven by wrk.

    .venv/bin/python -m bench.runner [--quick] [--duration S] [--rounds N]
                                     [--systems a,b] [--scenarios a,b]

Run through `scripts/bench`, which installs wrk and nginx when missing. Every
system serves the same files on a loopback port; each scenario runs every
system of its data set for the same time, round after round (A B C A B C),
so drift of the machine's load spreads over all of them. Around each run the
CPU time of the system and of its database server is read from /proc.
Results go to bench/results/.

Scenarios are listed in bench/scenarios.py, data sets and their systems in
bench/datasets.py: a new one is an entry there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import load, procfs, report
from bench.datasets import BACKENDS, DATA_SETS, HOT_CACHE, REALISTIC_CACHE, Context, Stage
from bench.scenarios import SCENARIOS, SLOW_READERS, Scenario, nothing
from bench.systems import HERE, VENV_BIN, System


def _children_cpu_seconds() -> float:
    """CPU of this process's children that have exited and been waited for."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


async def measure(system: System, scenario: Scenario, stage: Stage, seconds: int, threads: int,
                  profile: Path | None = None
                  ) -> tuple[report.WrkRun, list[float], report.Usage]:
    """One run of a scenario on a system: wrk's figures, peak RSS per worker, and its costs."""
    db = system.database
    if system.db_only:
        # Its own process, run and waited for here: its CPU is a child's.
        before = report.Usage(_children_cpu_seconds(), db.cpu_seconds() if db else None)
        run = await load.run_db_only(system, stage.files["large"][0], scenario.connections,
                                     seconds)
        after = report.Usage(_children_cpu_seconds(), db.cpu_seconds() if db else None)
        return run, [], after - before
    pids = system.worker_pids()
    procfs.reset_peak_rss(pids)
    spy = None
    if profile is not None:
        # Collapsed stacks of the first worker, sampled while wrk runs.
        spy = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--nonblocking",
            "-o", str(profile), "-d", str(seconds + (0 if scenario.around is nothing else 1)),
            "-p", str(pids[0]), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
    async with scenario.around(system, stage):
        before = await asyncio.to_thread(system.usage)
        run = await load.run_wrk(system, stage.paths[system.name][scenario.paths],
                                 scenario.connections, seconds, threads, scenario.inm,
                                 scenario.walk)
        after = await asyncio.to_thread(system.usage)
    if spy is not None:
        await spy.wait()
    return run, procfs.peak_rss_mib(pids), after - before


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python "
            f"{platform.python_version()}; load average at start {load_avg}")


async def run_data_set(name: str, scenarios: list[str], ctx: Context, args: argparse.Namespace,
                       figures: dict[str, dict[str, report.Figures]], data: dict[str, Any]
                       ) -> None:
    """Set one data set up, run its scenarios round after round, tear it down."""
    async with DATA_SETS[name](ctx) as stage:
        data[name] = stage.notes
        for scenario_name in scenarios:
            scenario = SCENARIOS[scenario_name]
            chosen = [s for s in stage.systems if scenario.db_only or not s.db_only]
            if scenario.warmup:
                for s in chosen:
                    print(f"bench: {scenario_name} warm-up: {s.name}", flush=True)
                    await measure(s, scenario, stage, args.duration, args.threads)
            for round_ in range(args.rounds):
                for s in chosen:
                    print(f"bench: {scenario_name} round {round_ + 1}/{args.rounds}: {s.name}",
                          flush=True)
                    profile = None
                    if s.name == args.profile and round_ == 0:
                        profile = args.out / f"profile-{s.name}-{scenario_name}.txt"
                        args.out.mkdir(parents=True, exist_ok=True)
                    result, rss, usage = await measure(s, scenario, stage, args.duration,
                                                       args.threads, profile)
                    f = figures.setdefault(scenario_name, {}).setdefault(s.name, report.Figures())
                    f.runs.append(result)
                    f.rss_mib.extend(rss)
                    f.usage.append(usage)
                    await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="si-bench-"))
    os.chmod(tmp, 0o755)  # nginx's workers run as an unprivileged user and read the files
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_at_start = machine()
    backends = [b for b in BACKENDS if any(b in s for s in args.systems)] if args.systems \
        else list(BACKENDS)
    ctx = Context(tmp, args.work, backends,
                  lambda name: args.systems is None or name in args.systems)
    figures: dict[str, dict[str, report.Figures]] = {}
    data: dict[str, Any] = {}
    try:
        for name in DATA_SETS:
            mine = [s for s in args.scenarios if SCENARIOS[s].data == name]
            if mine:
                await run_data_set(name, mine, ctx, args, figures, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summaries = {sc: {name: f.summary() for name, f in by.items()} for sc, by in figures.items()}
    rat = report.ratios(summaries, {sc: SCENARIOS[sc].figure for sc in summaries})
    return {
        "started": started,
        "command": args.command,
        "machine": load_at_start + "; at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "settings": {"duration_s": args.duration, "rounds": args.rounds,
                     "wrk_threads": args.threads, "slow_readers": SLOW_READERS,
                     "hot_cache": HOT_CACHE, "realistic_hot_cache": REALISTIC_CACHE},
        "scenarios": {sc: SCENARIOS[sc].text for sc in summaries},
        "data": data,
        "summaries": summaries,
        "ratios": rat,
        "targets": report.target_dicts(report.targets(summaries, rat)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = [name for name, s in SCENARIOS.items() if s.default]
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s per system and round")
    p.add_argument("--duration", type=int, default=3, help="seconds per system and round (3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per scenario (2)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--systems", type=lambda v: v.split(","), default=None,
                   help="only these systems (comma-separated names)")
    p.add_argument("--scenarios", type=lambda v: v.split(","), default=defaults,
                   help=f"some of {','.join(SCENARIOS)} (default {','.join(defaults)})")
    p.add_argument("--profile", metavar="SYSTEM",
                   help="sample SYSTEM's first worker with py-spy in each scenario's first "
                        "round; collapsed stacks go to OUT/profile-SYSTEM-SCENARIO.txt")
    p.add_argument("--out", type=Path, default=HERE / "results", help="bench/results")
    p.add_argument("--work", type=Path, default=HERE / "work",
                   help="where generated data is kept between runs (bench/work)")
    args = p.parse_args(argv)
    args.work = args.work.resolve()  # site files elsewhere name the SQLite copy in it
    if args.quick:
        args.duration = 1
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario {', '.join(sorted(unknown))}")
    given = shlex.join(argv if argv is not None else sys.argv[1:])
    args.command = f"scripts/bench {given}".strip()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report.markdown(result)
    (args.out / "latest.md").write_text(md)
    report.chart(result, str(args.out / "latest.png"))
    print(md)
    print(f"bench: wrote {args.out}/latest.json, latest.md, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
