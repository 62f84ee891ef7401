"""Warm reads through each system: sequential reads of a large file, random 4 KiB reads in it, and
whole reads of many small files.

Per repetition, fresh mounts in a rotated order (see metadata.py for why), then one worker per
kind of read warms every system's copy once and times it in rounds, one pass per system per round,
rotated: the figure is the median over all rounds of the per-round ratio to direct, min/max are
the per-repetition medians. The automounters are out of the data path (the repository is a FUSE
mount of its own), so these ratios should be 1.0 within noise.
"""

from __future__ import annotations

import os
from typing import Any

from ..common import paired_ratio, percentile, run_rounds, summary
from ..workspace import DATA_REPO
from . import Context, rotated, started

KINDS = ("seq_large", "rand_large", "small_files")


def run(ctx: Context) -> dict[str, Any]:
    names = ctx.warm_systems()
    sz = ctx.sizes
    large, small = ctx.ws.data(sz.read_large_mib << 20, sz.read_small_count, sz.read_small_bytes)
    # [system][kind][rep] -> per-round times (ms)
    wall: dict[str, dict[str, list[list[float]]]] = {n: {k: [] for k in KINDS} for n in names}
    cpu: dict[str, dict[str, list[list[float]]]] = {n: {k: [] for k in KINDS} for n in names}
    nbytes: dict[str, int] = {}
    for i in range(sz.read_reps):
        order = rotated(names, i)
        with started(ctx, order, f"reads{i}",
                     repos=lambda n: [DATA_REPO] if n.startswith("direct") else []) as sy:
            lists = {}
            for name in order:
                root = sy[name].path(DATA_REPO)
                os.stat(root / large)  # the automounters mount the repository here
                listfile = ctx.ws.base / f"reads-{name}.list"
                listfile.write_text("".join(f"{root / rel}\n" for rel in small))
                lists[name] = listfile
            big = {n: str(sy[n].path(DATA_REPO) / large) for n in order}
            specs = {
                "seq_large": ("read-seq", {n: [big[n], str(1 << 20)] for n in order}),
                "rand_large": ("read-rand", {n: [big[n], str(sz.read_rand_count),
                                                 str(sz.read_rand_block), str(i)]
                                             for n in order}),
                "small_files": ("read-small", {n: [str(lists[n])] for n in order}),
            }
            for kind, (mode, args) in specs.items():
                result = run_rounds(ctx.ws.base / f"reads-{kind}.json", mode, args,
                                    sz.warm_rounds)
                for name in order:
                    wall[name][kind].append([t / 1e6 for t in result[name]["wall_ns"]])
                    cpu[name][kind].append([t / 1e6 for t in result[name]["cpu_ns"]])
                    nbytes[kind] = result[name]["extra"]["bytes"]
            ctx.say(f"rep {i + 1}/{sz.read_reps} (seq/rand/small ms, medians): " + ", ".join(
                f"{n} " + "/".join(f"{percentile(wall[n][k][-1], 50):.1f}" for k in KINDS)
                for n in order))
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {}
        for kind in KINDS:
            per_rep = [percentile(r, 50) for r in wall[name][kind]]
            entry: dict[str, Any] = {"ms": summary(per_rep), "samples_ms": per_rep}
            median = entry["ms"]["median"]
            if median:
                entry["mib_per_s"] = round(nbytes[kind] / (1 << 20) / (median / 1000), 1)
            if "direct" in names:
                entry["ratio"] = paired_ratio(wall[name][kind], wall["direct"][kind])
                entry["cpu_ratio"] = paired_ratio(cpu[name][kind], cpu["direct"][kind])
            if name == "cvmfsd" and "autofs" in names:
                entry["vs_autofs"] = paired_ratio(wall[name][kind], wall["autofs"][kind])
            out[name][kind] = entry
    return {
        "params": {"large_mib": sz.read_large_mib, "rand_reads": sz.read_rand_count,
                   "rand_block": sz.read_rand_block, "small_files": sz.read_small_count,
                   "small_bytes": sz.read_small_bytes, "reps": sz.read_reps,
                   "rounds": sz.warm_rounds},
        "systems": out,
    }
