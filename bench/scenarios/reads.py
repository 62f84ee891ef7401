"""Warm reads through each system: sequential reads of a large file, random 4 KiB reads in it, and
whole reads of many small files, each warmed once and then timed in a few passes (the median pass
counts), in a fresh worker per measurement; fresh mounts per repetition, systems in a rotated
order. The automounters are out of the data path (the repository is a FUSE mount of its own), so
the ratios to direct should be 1.0 within noise.
"""

from __future__ import annotations

import os
from typing import Any

from ..common import ratios, run_worker, summary
from ..workspace import DATA_REPO
from . import Context, ms, rotated, started

KINDS = ("seq_large", "rand_large", "small_files")


def run(ctx: Context) -> dict[str, Any]:
    names = ctx.systems
    sz = ctx.sizes
    large, small = ctx.ws.data(sz.read_large_mib << 20, sz.read_small_count, sz.read_small_bytes)
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in names}
    nbytes: dict[str, int] = {}
    passes = str(sz.warm_passes)
    for i in range(sz.read_reps):
        order = rotated(names, i)
        # Fresh mounts per repetition (see metadata.py): a mount's page cache can be faster or
        # slower than another's for reasons unrelated to the automounter.
        with started(ctx, order, f"reads{i}",
                     repos=lambda n: [DATA_REPO] if n == "direct" else []) as sy:
            lists = {}
            for name in order:
                root = sy[name].path(DATA_REPO)
                os.stat(root / large)  # the automounters mount the repository here
                listfile = ctx.ws.base / f"reads-{name}.list"
                listfile.write_text("".join(f"{root / rel}\n" for rel in small))
                lists[name] = listfile
            line = []
            for name in order:
                path = str(sy[name].path(DATA_REPO) / large)
                seq = run_worker("read-seq", passes, path, str(1 << 20))
                rnd = run_worker("read-rand", passes, path, str(sz.read_rand_count),
                                 str(sz.read_rand_block), str(i))
                sml = run_worker("read-small", passes, str(lists[name]))
                for kind, result in zip(KINDS, (seq, rnd, sml), strict=True):
                    times[name][kind].append(ms(result["ns"]))
                    nbytes[kind] = result["bytes"]
                line.append(f"{name} " + "/".join(f"{times[name][k][-1]:.1f}" for k in KINDS))
            ctx.say(f"rep {i + 1}/{sz.read_reps} (seq/rand/small ms): " + ", ".join(line))
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {}
        for kind in KINDS:
            entry: dict[str, Any] = {"ms": summary(times[name][kind]),
                                     "samples_ms": times[name][kind]}
            median = entry["ms"]["median"]
            if median:
                entry["mib_per_s"] = round(nbytes[kind] / (1 << 20) / (median / 1000), 1)
            if "direct" in names:
                entry["ratio"] = ratios(times[name][kind], times["direct"][kind])
            out[name][kind] = entry
    return {
        "params": {"large_mib": sz.read_large_mib, "rand_reads": sz.read_rand_count,
                   "rand_block": sz.read_rand_block, "small_files": sz.read_small_count,
                   "small_bytes": sz.read_small_bytes, "reps": sz.read_reps,
                   "passes": sz.warm_passes},
        "systems": out,
    }
