"""Storm: P processes x R cold repositories at once.

Per repetition and per automounter, a fresh instance and R never-mounted repositories; P worker
processes, all started and waiting first, are let go together; each stats README in every one of
the R repositories, in its own shuffled order. Reported: the time until all succeeded, p50/p99 of
the P x R per-access latencies, the number of backend launches (exactly R is right: one per
repository, however many processes asked), and errors.

Baseline (direct): the same R repositories booted by hand, all R launches started at once — what
the backend itself needs to boot R repositories in parallel on this machine.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from ..common import Worker, percentile, summary
from ..systems import Direct
from ..workspace import DOMAIN
from . import Context, ms, rotated, started


def _direct(ctx: Context, rep: int, repos: list[str]) -> dict[str, Any]:
    """R launches at once, by hand: per-launch latency from the common start."""
    with started(ctx, ["direct"], f"storm{rep}") as systems:
        system = systems["direct"]
        assert isinstance(system, Direct)
        ends: dict[str, tuple[int, int]] = {}
        go = time.perf_counter_ns()
        procs = {repo: system.launch(repo) for repo in repos}

        def wait(repo: str) -> None:
            rc = procs[repo].wait()
            ends[repo] = (time.perf_counter_ns(), rc)

        threads = [threading.Thread(target=wait, args=(r,)) for r in repos]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for repo in repos:
            if procs[repo].stderr is not None:
                procs[repo].stderr.close()
            system.note_serving_pid(repo)
        latencies = [ms(end - go) for end, _ in ends.values()]
        return {"latencies_ms": latencies, "makespan_ms": max(latencies),
                "errors": sum(1 for _, rc in ends.values() if rc != 0),
                "boots": len(system.boots()), "per_repo_boots": [1] * len(repos)}


def _automounter(ctx: Context, name: str, rep: int, repos: list[str]) -> dict[str, Any]:
    procs = ctx.sizes.storm_procs
    with started(ctx, [name], f"storm{rep}") as systems:
        system = systems[name]
        paths = [str(system.path(r) / ctx.ws.cold_file) for r in repos]
        read_end, write_end = os.pipe()
        workers: list[Worker] = []
        try:
            # One pipe is every worker's stdin: P bytes written at once release them together.
            for i in range(procs):
                workers.append(Worker("storm", str(rep * 1000 + i), *paths, stdin=read_end))
            for w in workers:
                w.ready()
            go = time.perf_counter_ns()
            os.write(write_end, b"g" * procs)
            results = [w.result() for w in workers]
        finally:
            os.close(read_end)
            os.close(write_end)
            for w in workers:
                w.close()
        samples = [s for r in results for s in r["samples"]]
        latencies = [ms(end - start) for start, end, _ in samples]
        per_repo = Counter(system.boots())
        return {"latencies_ms": latencies,
                "makespan_ms": ms(max(end for _, end, _ in samples) - go),
                "errors": sum(1 for *_, err in samples if err),
                "boots": sum(per_repo.values()),
                "per_repo_boots": [per_repo.get(r, 0) for r in repos]}


def run(ctx: Context) -> dict[str, Any]:
    sz = ctx.sizes
    names = ctx.systems
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(sz.storm_reps):
        for name in rotated(names, rep):
            repos = [ctx.ws.tiny(f"storm{rep}-{i:02d}-{name}.{DOMAIN}")
                     for i in range(sz.storm_repos)]
            if name == "direct":
                result = _direct(ctx, rep, repos)
            else:
                result = _automounter(ctx, name, rep, repos)
            runs[name].append(result)
            ctx.say(f"rep {rep + 1}/{sz.storm_reps} {name}: all done in "
                    f"{result['makespan_ms']:.0f} ms, p99 "
                    f"{percentile(result['latencies_ms'], 99):.0f} ms, boots {result['boots']}, "
                    f"errors {result['errors']}")
    out: dict[str, Any] = {}
    for name in names:
        lat = [v for r in runs[name] for v in r["latencies_ms"]]
        out[name] = {
            "makespan_ms": summary([r["makespan_ms"] for r in runs[name]]),
            "latency_ms": {**summary(lat), "p50": round(percentile(lat, 50), 4),
                           "p90": round(percentile(lat, 90), 4)},
            "p99_per_rep_ms": [round(percentile(r["latencies_ms"], 99), 4) for r in runs[name]],
            "boots_per_rep": [r["boots"] for r in runs[name]],
            "max_boots_per_repo": max(max(r["per_repo_boots"]) for r in runs[name]),
            "min_boots_per_repo": min(min(r["per_repo_boots"]) for r in runs[name]),
            "errors": sum(r["errors"] for r in runs[name]),
            "accesses": len(lat),
            # Kept for the latency-distribution plot (one rep's worth is plenty).
            "latencies_ms": runs[name][-1]["latencies_ms"],
        }
    return {
        "params": {"procs": sz.storm_procs, "repos": sz.storm_repos, "reps": sz.storm_reps,
                   "direct": "R launches at once by hand (baseline: parallel boots)"},
        "systems": out,
    }
