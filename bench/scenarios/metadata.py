"""Warm metadata: a stat of every file of a large tree, and a `find` over it, through each system.

Per repetition, fresh instances of every system mount the tree repository (direct: by hand; the
automounters: on a first access), in a rotated order. Fresh mounts per repetition, because the
kernel caches of one mount instance can be consistently faster or slower than another's for
reasons that have nothing to do with the automounter (where its memory happened to land): that
variance belongs in the spread, not in a bias.

Then one worker process stats every file of every system's tree once (warm), and then in rounds:
one timed pass per system per round, rotated. Another does the same with `find`. Interleaving pass
by pass keeps the comparison fair on a busy machine: the figure is the median over all rounds of
the per-round ratio to direct; min/max are the per-repetition medians.
"""

from __future__ import annotations

import os
from typing import Any

from ..common import paired_ratio, percentile, run_rounds, summary
from ..workspace import TREE_REPO
from . import Context, rotated, started


def run(ctx: Context) -> dict[str, Any]:
    names = ctx.warm_systems()
    sz = ctx.sizes
    rels = ctx.ws.tree(sz.meta_dirs, sz.meta_files)
    # [system][rep] -> per-round times (ms)
    stat_wall: dict[str, list[list[float]]] = {n: [] for n in names}
    stat_cpu: dict[str, list[list[float]]] = {n: [] for n in names}
    find_wall: dict[str, list[list[float]]] = {n: [] for n in names}
    entries: dict[str, int] = {}
    for i in range(sz.meta_reps):
        order = rotated(names, i)
        with started(ctx, order, f"meta{i}",
                     repos=lambda n: [TREE_REPO] if n.startswith("direct") else []) as sy:
            lists = {}
            for name in order:
                root = sy[name].path(TREE_REPO)
                os.stat(root / rels[0])  # the automounters mount the tree here
                listfile = ctx.ws.base / f"meta-{name}.list"
                listfile.write_text("".join(f"{root / rel}\n" for rel in rels))
                lists[name] = listfile
            stats = run_rounds(ctx.ws.base / "meta-stat.json", "stat-loop",
                               {n: [str(lists[n])] for n in order}, sz.warm_rounds)
            finds = run_rounds(ctx.ws.base / "meta-find.json", "find",
                               {n: [str(sy[n].path(TREE_REPO))] for n in order},
                               sz.warm_rounds)
            for name in order:
                stat_wall[name].append([t / 1e6 for t in stats[name]["wall_ns"]])
                stat_cpu[name].append([t / 1e6 for t in stats[name]["cpu_ns"]])
                find_wall[name].append([t / 1e6 for t in finds[name]["wall_ns"]])
                entries[name] = finds[name]["extra"]["entries"]
            ctx.say(f"rep {i + 1}/{sz.meta_reps}: " + ", ".join(
                f"{n} stat {percentile(stat_wall[n][-1], 50):.1f} "
                f"find {percentile(find_wall[n][-1], 50):.1f}" for n in order) + " ms (medians)")
    out: dict[str, Any] = {}
    for name in names:
        rep_stat = [percentile(r, 50) for r in stat_wall[name]]
        rep_find = [percentile(r, 50) for r in find_wall[name]]
        out[name] = {
            "stat_loop_ms": summary(rep_stat),
            "stat_us_each": round(percentile(rep_stat, 50) * 1000 / len(rels), 3),
            "stat_loop_cpu_ms": summary([percentile(r, 50) for r in stat_cpu[name]]),
            "find_ms": summary(rep_find),
            "find_entries": entries.get(name),
            "stat_loop_samples_ms": rep_stat,
            "find_samples_ms": rep_find,
        }
        if "direct" in names:
            out[name]["stat_ratio"] = paired_ratio(stat_wall[name], stat_wall["direct"])
            out[name]["stat_cpu_ratio"] = paired_ratio(stat_cpu[name], stat_cpu["direct"])
            out[name]["find_ratio"] = paired_ratio(find_wall[name], find_wall["direct"])
        if name == "cvmfsd" and "autofs" in names:
            # Head to head, round by round: "no worse than autofs" is this ratio <= 1.
            out[name]["stat_vs_autofs"] = paired_ratio(stat_wall[name], stat_wall["autofs"])
            out[name]["find_vs_autofs"] = paired_ratio(find_wall[name], find_wall["autofs"])
    return {
        "params": {"stats_per_loop": len(rels), "tree_files": len(rels),
                   "rounds": sz.warm_rounds, "tree_dirs": sz.meta_dirs, "reps": sz.meta_reps},
        "systems": out,
    }
