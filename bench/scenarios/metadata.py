"""Warm metadata: a stat of every file of a large tree, and a `find` over it, through each system.

Per repetition, fresh instances of every system mount the tree repository (direct: by hand; the
automounters: on a first access), in a rotated order; then, per system, a fresh worker stats every
file once to warm the caches and then in a few timed passes (the median pass counts), and another
runs `find` the same way. Fresh mounts per repetition: the kernel caches of one mount instance can
be consistently faster or slower than another's for reasons that have nothing to do with the
automounter (where its memory happened to land), so that variance belongs in the spread, not in
a bias. Reported: medians over repetitions with min/max, and the ratio of each system to direct.
"""

from __future__ import annotations

import os
from typing import Any

from ..common import ratios, run_worker, summary
from ..workspace import TREE_REPO
from . import Context, ms, rotated, started


def run(ctx: Context) -> dict[str, Any]:
    names = ctx.systems
    sz = ctx.sizes
    rels = ctx.ws.tree(sz.meta_dirs, sz.meta_files)
    stats: dict[str, list[float]] = {n: [] for n in names}
    finds: dict[str, list[float]] = {n: [] for n in names}
    entries: dict[str, int] = {}
    passes = str(sz.warm_passes)
    for i in range(sz.meta_reps):
        order = rotated(names, i)
        with started(ctx, order, f"meta{i}",
                     repos=lambda n: [TREE_REPO] if n == "direct" else []) as sy:
            lists = {}
            for name in order:
                root = sy[name].path(TREE_REPO)
                os.stat(root / rels[0])  # the automounters mount the tree here
                listfile = ctx.ws.base / f"meta-{name}.list"
                listfile.write_text("".join(f"{root / rel}\n" for rel in rels))
                lists[name] = listfile
            line = []
            for name in order:
                took = ms(run_worker("stat-loop", passes, str(lists[name]))["ns"])
                found = run_worker("find", passes, str(sy[name].path(TREE_REPO)))
                stats[name].append(took)
                finds[name].append(ms(found["ns"]))
                entries[name] = found["entries"]
                line.append(f"{name} stat {took:.1f} find {ms(found['ns']):.1f}")
            ctx.say(f"rep {i + 1}/{sz.meta_reps}: " + ", ".join(line) + " ms")
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {
            "stat_loop_ms": summary(stats[name]),
            "stat_us_each": round(summary(stats[name])["median"] * 1000 / len(rels), 3),
            "find_ms": summary(finds[name]),
            "find_entries": entries.get(name),
            "stat_loop_samples_ms": stats[name],
            "find_samples_ms": finds[name],
        }
        if "direct" in names:
            out[name]["stat_ratio"] = ratios(stats[name], stats["direct"])
            out[name]["find_ratio"] = ratios(finds[name], finds["direct"])
    return {
        "params": {"stats_per_loop": len(rels), "tree_files": len(rels),
                   "passes": sz.warm_passes, "tree_dirs": sz.meta_dirs, "reps": sz.meta_reps},
        "systems": out,
    }
