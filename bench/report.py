"""Turn a results dict into results.json, results.md and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLORS = {"direct": "#7f7f7f", "direct2": "#c7c7c7", "autofs": "#d62728", "cvmfsd": "#1f77b4"}
LABELS = {"direct2": "direct2 (A/A control)"}
DPI = 90


def _f(value: Any, fmt: str = ".2f") -> str:
    return "&ndash;" if value is None else format(value, fmt)


def _span(s: dict[str, Any] | None, fmt: str = ".2f") -> str:
    """median [min-max] of a summary."""
    if not s or s.get("median") is None:
        return "&ndash;"
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}&ndash;{s['max']:{fmt}}]"


def _ratio(r: dict[str, Any] | None) -> str:
    if not r or r.get("median") is None:
        return "&ndash;"
    return f"{r['median']:.3f}&times; [{r['min']:.3f}&ndash;{r['max']:.3f}]"


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = _plots(results, out)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    written.append(json_path)
    md_path = out / "results.md"
    md_path.write_text(markdown(results, plots))
    written.append(md_path)
    return written + [out / p for p in plots.values()]


# --- Markdown -----------------------------------------------------------------------------------
def markdown(r: dict[str, Any], plots: dict[str, str]) -> str:
    m, v, sc = r["machine"], r["versions"], r["scenarios"]
    lines = [
        "# cvmfsd benchmark results",
        "",
        ("**Quick smoke run: sizes are tiny, the figures say nothing about speed.**\n"
         if r.get("quick") else ""),
        f"- command: `{r['command']}` (from the repository root, as root)",
        f"- started {r['started']}, took {r.get('seconds', 0):.0f} s; load average "
        f"{m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel "
        f"{m['kernel']}, {m['os']}",
        f"- versions: cvmfsd {v.get('cvmfsd')} (git {str(v.get('git_commit'))[:12]}"
        f"{', dirty' if v.get('git_dirty') else ''}), Python {v['python']}, pyfuse3 "
        f"{v.get('pyfuse3')}, trio {v.get('trio')}, {v.get('libfuse')}, "
        f"automount {v.get('automount')}",
        f"- backend: {v.get('backend')}, the same for every system",
        f"- systems: {', '.join(r['systems']['compared'])}"
        + "".join(f"; {k} skipped: {why}" for k, why in r["systems"]["unavailable"].items()),
        "- every figure: median [min&ndash;max] over repetitions, systems interleaved per "
        "repetition; ratios are to direct. How each scenario measures: "
        "[bench/README.md](../README.md).",
        "",
        "## Targets",
        "",
        "| target | met | figure |",
        "|---|---|---|",
    ]
    for t in r.get("targets", []):
        met = {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]
        if t["met"] is None and t["figure"].startswith("dropped"):
            met = "dropped"
        lines.append(f"| {t['target']} | {met} | {t['figure']} |")
    ref = r.get("reference", {})
    measured_on = ("measured on another machine, for comparison"
                   if r.get("backend", {}).get("kind") == "real" else "not measured here")
    lines += ["", f"Reference figures from the issue (real cvmfs2 2.12, {measured_on}): "
              + ", ".join(f"{k.replace('_', ' ')} {val}" for k, val in ref.items()) + ".", ""]
    for name, fn in (("cold", _md_cold), ("metadata", _md_meta), ("reads", _md_reads),
                     ("storm", _md_storm), ("footprint", _md_footprint), ("csi", _md_csi),
                     ("attack", _md_attack), ("restart", _md_restart)):
        if name not in sc:
            continue
        res = sc[name]
        lines += [f"## {name}", ""]
        if res.get("status") != "ok":
            lines += [f"Status: {res.get('status')} — {res.get('reason') or res.get('error')}", ""]
            continue
        lines += fn(res)
        if name in plots:
            lines += ["", f"![{name}]({plots[name]})"]
        load = res.get("loadavg_1min") or ["?", "?"]
        lines += ["", f"({res.get('seconds', 0):.0f} s; 1-minute load average {load[0]} before, "
                  f"{load[1]} after)", ""]
    if r.get("leaked_mounts"):
        lines += ["## Leaks", "", f"Mounts forced away at the end: {r['leaked_mounts']}", ""]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _md_cold(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [
        f"{p['reps']} fresh repositories per system; stat of `<repo>/{p['file']}` from a fresh "
        f"process. Backend boot (direct launch): {_span(res['backend_boot_ms'], '.1f')} ms; "
        f"first stat after it: {_span(res['direct_first_stat_ms'], '.2f')} ms; cvmfsd's own "
        f"logged mount duration: {_span(res['cvmfsd_logged_mount_ms'], '.1f')} ms.",
        "",
        "| system | first access ms | launcher inside it ms | rest ms | (before / after "
        "launcher) | overhead per access ms | overhead, medians ms | boots | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in res["systems"].items():
        rows.append(f"| {name} | {_span(s['first_access_ms'], '.1f')} | "
                    f"{_span(s['launcher_ms'], '.1f')} | {_span(s['outside_launcher_ms'])} | "
                    f"{_f(s['before_launcher_ms']['median'])} / "
                    f"{_f(s['after_launcher_ms']['median'])} | "
                    f"{_f(s.get('overhead_ms'), '+.2f')} | "
                    f"{_f(s.get('overhead_literal_ms'), '+.1f')} | {s['boots']} | "
                    f"{s['errors']} |")
    rows += ["", "*rest* = first access minus the run time of the cvmfs2 launcher inside it "
             "(stamped by the counting wrapper), split into the part before the launcher started "
             "and the part after it exited (medians); *overhead per access* = median rest minus "
             "direct's median rest; *overhead, medians* = median first access minus median "
             "direct boot + first stat (the literal definition, carrying the boots' noise)."]
    return rows


def _md_meta(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [f"{p['stats_per_loop']} stats (every file of a {p['tree_dirs']}-directory tree) and "
            f"a `find` over it, warm; {p['reps']} repetitions on fresh mounts, each {p['rounds']} "
            "rounds of one pass per system (interleaved). Times: median [min&ndash;max] of the "
            "per-repetition medians; ratios: median of the per-round ratios to direct "
            "[min&ndash;max of the per-repetition medians]; CPU: the same on the worker's CPU "
            "time (immune to preemption by other jobs).", "",
            "| system | stat loop ms | µs per stat | ratio | CPU ratio | find ms | entries "
            "| ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, s in res["systems"].items():
        rows.append(f"| {name} | {_span(s['stat_loop_ms'], '.1f')} | {s['stat_us_each']:.2f} | "
                    f"{_ratio(s.get('stat_ratio'))} | {_ratio(s.get('stat_cpu_ratio'))} | "
                    f"{_span(s['find_ms'], '.1f')} | {s['find_entries']} | "
                    f"{_ratio(s.get('find_ratio'))} |")
    head = res["systems"].get("cvmfsd", {})
    if head.get("stat_vs_autofs"):
        rows += ["", f"Head to head, round by round, cvmfsd / autofs: stats "
                 f"{_ratio(head['stat_vs_autofs'])}, find {_ratio(head['find_vs_autofs'])}."]
    if "direct2" in res["systems"]:
        rows += ["", "direct2 is a second direct mount of the same repository: the A/A control, "
                 "how far two identical mounts differ here."]
    return rows


def _md_reads(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [f"Sequential read of a {p['large_mib']} MiB file (1 MiB reads), {p['rand_reads']} "
            f"random {p['rand_block']} B preads in it, whole reads of {p['small_files']} files of "
            f"{p['small_bytes']} B; warm; {p['reps']} repetitions on fresh mounts, each "
            f"{p['rounds']} interleaved rounds (figures as for metadata).", "",
            "| system | kind | ms | MiB/s | ratio | CPU ratio |", "|---|---|---|---|---|---|"]
    labels = {"seq_large": "sequential", "rand_large": "random 4 KiB",
              "small_files": "small files"}
    for name, s in res["systems"].items():
        for kind, label in labels.items():
            e = s[kind]
            rows.append(f"| {name} | {label} | {_span(e['ms'], '.1f')} | "
                        f"{_f(e.get('mib_per_s'), '.0f')} | {_ratio(e.get('ratio'))} | "
                        f"{_ratio(e.get('cpu_ratio'))} |")
    head = res["systems"].get("cvmfsd", {})
    if head.get("seq_large", {}).get("vs_autofs"):
        rows += ["", "Head to head, round by round, cvmfsd / autofs: " + ", ".join(
            f"{label} {_ratio(head[kind]['vs_autofs'])}" for kind, label in labels.items()) + "."]
    if "direct2" in res["systems"]:
        rows += ["", "direct2 is a second direct mount (the A/A control)."]
    return rows


def _md_storm(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [f"{p['procs']} processes &times; {p['repos']} cold repositories, {p['reps']} "
            f"repetitions (direct: {p['direct']}).", "",
            "| system | all done ms | p50 ms | p99 ms | max ms | boots per repetition | errors |",
            "|---|---|---|---|---|---|---|"]
    for name, s in res["systems"].items():
        lat = s["latency_ms"]
        rows.append(f"| {name} | {_span(s['makespan_ms'], '.0f')} | {lat['p50']:.2f} | "
                    f"{lat['p99']:.1f} | {lat['max']:.1f} | {s['boots_per_rep']} | "
                    f"{s['errors']} |")
    return rows


def _md_footprint(res: dict[str, Any]) -> list[str]:
    rows = [f"Idle CPU sampled over {res['params']['window_s']} s at each count.", "",
            "| system | repositories | RSS MiB | USS MiB | CPU % idle | threads "
            "| backends' RSS MiB (each) |", "|---|---|---|---|---|---|---|"]
    for name, s in res["systems"].items():
        for pt in s["points"]:
            each = pt.get("backend_rss_kib_each")
            rows.append(f"| {name} | {pt['repos']} | {pt['rss_kib'] / 1024:.1f} | "
                        f"{pt['uss_kib'] / 1024:.1f} | {pt['cpu_percent']:.2f} | "
                        f"{pt['threads']} | {pt['backends_rss_kib'] / 1024:.0f}"
                        f" ({_f(each / 1024 if each else None, '.1f')}) |")
    for name, s in res["systems"].items():
        rows.append(f"\n{name}: {_f(s['rss_kib_per_repo'], '.1f')} KiB RSS "
                    f"({_f(s['uss_kib_per_repo'], '.1f')} KiB USS) per mounted repository.")
    return rows


def _md_csi(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [f"{p['cycles']} publish/unpublish cycles per volume kind ({p['cold']} for cold "
            f"repositories); {p['plugin']}.", "",
            "| volume | publish median ms | publish p99 ms | unpublish median ms "
            "| unpublish p99 ms | n |", "|---|---|---|---|---|---|"]
    for kind, s in res["kinds"].items():
        pub, unp = s["publish_ms"], s["unpublish_ms"]
        rows.append(f"| {kind.replace('_', ' ')} | {_f(pub['median'])} | {_f(pub['p99'])} | "
                    f"{_f(unp['median'])} | {_f(unp['p99'])} | {pub['n']} |")
    return rows


def _md_attack(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [f"Per attack, two fresh cvmfsd instances side by side, one attacked for "
            f"{p['seconds']:g} s at full pressure; {p['reps']} legitimate first accesses of "
            "new repositories per instance (rotated order), alternately by another uid and "
            f"by another pod with the attacker's uid (pods: {p['pods']}). *boot*: the cvmfs2 "
            "launcher's own run time inside the access; *over boot*: first access minus it. "
            "RSS of the attacked daemon, sampled every 0.5 s.", "",
            "| attack | first access ms, attacked | unattacked | ratio | boot ms, attacked "
            "| over boot ms, attacked (unattacked) | errors | RSS MiB start / peak / end "
            "| 2nd half | attack |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in res["attacks"].items():
        hit, base = a["conditions"]["attacked"], a["conditions"]["base"]
        rss = a["rss"]["attacked"]
        rows.append(
            f"| {name} | {_span(hit['first_access_ms'], '.0f')} | "
            f"{_span(base['first_access_ms'], '.0f')} | {_f(a['ratio'], '.2f')} | "
            f"{_span(hit['launcher_ms'], '.0f')} | {_f(hit['overhead_ms']['median'], '+.1f')} "
            f"({_f(base['overhead_ms']['median'], '+.1f')}) | {hit['errors']} "
            f"({base['errors']}) | {_f(rss['start_mib'], '.1f')} / {_f(rss['peak_mib'], '.1f')}"
            f" / {_f(rss['end_mib'], '.1f')} | {_f(rss['second_half_growth_mib'], '+.1f')} | "
            + ", ".join(f"{k} {v}" for k, v in a["attack"].items()) + " |")
    problems = {n: a["status_after"].get("problems") for n, a in res["attacks"].items()
                if a["status_after"].get("problems")}
    if problems:
        rows += ["", "Attacked daemon's problems at the end: " + "; ".join(
            f"{n}: {', '.join(p)}" for n, p in problems.items())]
    return rows


def _md_restart(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = [f"{p['readers']} readers (host, pod-like views, one with its cwd inside) over "
            f"{p['repos']} repositories, each operation an open+read+close and a stat with a "
            f"{p['pause_ms']} ms pause; {p['rounds']} restarts per path, each restart window "
            f"(trigger to ready + {p['settle_s']} s) paired with a baseline window just before "
            f"it; {res['ops']} operations, {res['failures']} failed.", "",
            "| path | restart p50 / p99 / max ms | baseline p50 / p99 / max ms | added at p99 ms "
            "| worst per restart, added ms (median, max) | ready after ms (median) |",
            "|---|---|---|---|---|---|"]
    for path, v in res["paths"].items():
        r, b = v["restart"], v["baseline"]
        ready = sorted(v["ready_ms"])[len(v["ready_ms"]) // 2] if v["ready_ms"] else None
        rows.append(f"| {path} | {r['p50']:.2f} / {r['p99']:.2f} / {r['max']:.1f} | "
                    f"{b['p50']:.2f} / {b['p99']:.2f} / {b['max']:.1f} | "
                    f"{v['added_p99_ms']:+.2f} | {v['added_worst_ms']['median']:+.1f}, "
                    f"{v['added_worst_ms']['max']:+.1f} | {_f(ready, '.0f')} |")
    return rows


# --- plots --------------------------------------------------------------------------------------
def _plots(r: dict[str, Any], out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: tables only
        return {}
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    sc = r["scenarios"]
    made = {}
    for name, fn in (("cold", _plot_cold), ("metadata", _plot_warm), ("storm", _plot_storm),
                     ("footprint", _plot_footprint), ("csi", _plot_csi),
                     ("attack", _plot_attack)):
        if sc.get(name, {}).get("status") != "ok":
            continue
        if name == "metadata" and sc.get("reads", {}).get("status") != "ok":
            continue
        fig = fn(plt, sc)
        fname = f"{'warm' if name == 'metadata' else name}.png"
        fig.savefig(out / fname, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        made["reads" if name == "metadata" else name] = fname
    return made


def _strip(ax: Any, data: dict[str, list[float]], ylabel: str) -> None:
    """Box plot with every sample drawn on it: with tens of samples, show them all."""
    import random

    names = list(data)
    ax.boxplot([data[n] for n in names], widths=0.5, showfliers=False,
               medianprops={"color": "black"})
    rng = random.Random(1)
    for i, n in enumerate(names, start=1):
        xs = [i + rng.uniform(-0.15, 0.15) for _ in data[n]]
        ax.scatter(xs, data[n], s=10, alpha=0.6, color=COLORS.get(n, "C0"), zorder=3)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _plot_cold(plt: Any, sc: dict[str, Any]) -> Any:
    res = sc["cold"]["systems"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    _strip(a, {n: s["samples_ms"] for n, s in res.items()}, "ms")
    a.set_title("cold first access (stat to answer)")
    _strip(b, {n: s["outside_samples_ms"] for n, s in res.items()}, "ms")
    b.set_title("minus the cvmfs2 launcher's own run time")
    fig.tight_layout()
    return fig


def _plot_warm(plt: Any, sc: dict[str, Any]) -> Any:
    meta, reads = sc["metadata"]["systems"], sc["reads"]["systems"]
    systems = [n for n in meta if n != "direct"]
    labels = ["stat loop", "find", "seq read", "random 4K", "small files"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / max(1, len(systems))
    for j, name in enumerate(systems):
        rs = [meta[name]["stat_ratio"], meta[name]["find_ratio"],
              reads[name]["seq_large"]["ratio"], reads[name]["rand_large"]["ratio"],
              reads[name]["small_files"]["ratio"]]
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(labels))]
        med = [x["median"] for x in rs]
        err = [[x["median"] - x["min"] for x in rs], [x["max"] - x["median"] for x in rs]]
        ax.bar(xs, [m - 1 for m in med], width * 0.9, bottom=1, color=COLORS.get(name),
               label=LABELS.get(name, name), yerr=err, capsize=3, ecolor="#444")
        for x, m in zip(xs, med, strict=True):
            ax.annotate(f"{m:.3f}", (x, m), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhspan(0.98, 1.02, color="green", alpha=0.08, label="+/-2% of direct")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("time / direct (median; bars: min-max)")
    ax.set_title("warm metadata and reads, relative to a direct mount")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def _plot_storm(plt: Any, sc: dict[str, Any]) -> Any:
    res = sc["storm"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for name, s in res["systems"].items():
        # A log axis: warm accesses take microseconds, cold ones up to seconds.
        lat = sorted(max(v, 1e-3) for v in s["latencies_ms"])
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        label = (f"{name}: {len(lat)} boots started at once" if name == "direct"
                 else f"{name}: p99 {s['latency_ms']['p99']:.0f} ms, boots {s['boots_per_rep']}")
        ax.step(lat, ys, where="post", color=COLORS.get(name), label=label)
    boot = sc.get("cold", {}).get("backend_boot_ms", {}).get("median")
    if boot:
        ax.axvline(boot + 100, color="green", ls="--", lw=1, label="one boot + 100 ms")
    p = res["params"]
    ax.set_title(f"storm: {p['procs']} processes x {p['repos']} cold repositories "
                 "(per-access latency, last repetition)")
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.set_ylabel("fraction of accesses done")
    ax.grid(alpha=0.3)
    ax.legend(frameon=True, framealpha=0.9, fontsize=8, loc="center left",
              bbox_to_anchor=(0.12, 0.4))
    fig.tight_layout()
    return fig


def _plot_footprint(plt: Any, sc: dict[str, Any]) -> Any:
    res = sc["footprint"]["systems"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, s in res.items():
        xs = [p["repos"] for p in s["points"]]
        a.plot(xs, [p["rss_kib"] / 1024 for p in s["points"]], "o-", color=COLORS.get(name),
               label=f"{name} RSS ({s['rss_kib_per_repo']:.0f} KiB/repo)"
               if s["rss_kib_per_repo"] is not None else f"{name} RSS")
        a.plot(xs, [p["uss_kib"] / 1024 for p in s["points"]], "o:", color=COLORS.get(name),
               alpha=0.6, label=f"{name} USS")
        b.plot(xs, [p["cpu_percent"] for p in s["points"]], "o-", color=COLORS.get(name),
               label=name)
    a.axhline(30, color="green", ls="--", lw=1, label="target: 30 MB idle")
    a.set_xlabel("repositories mounted")
    a.set_ylabel("MiB")
    a.set_title("daemon memory")
    a.legend(frameon=False, fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.42))
    a.grid(alpha=0.3)
    b.set_xlabel("repositories mounted")
    b.set_ylabel("% of one CPU")
    b.set_title("daemon CPU while idle")
    b.legend(frameon=False, fontsize=8)
    b.grid(alpha=0.3)
    for ax in (a, b):
        if max((p["repos"] for s in res.values() for p in s["points"]), default=0) >= 10:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks([p["repos"] for p in next(iter(res.values()))["points"]])
            ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
            ax.set_xlim(left=-0.3)
    fig.tight_layout()
    return fig


def _plot_csi(plt: Any, sc: dict[str, Any]) -> Any:
    kinds = sc["csi"]["kinds"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((a, "publish_samples_ms", "NodePublishVolume"),
                           (b, "unpublish_samples_ms", "NodeUnpublishVolume")):
        data = {k.replace("repository_", "repo ").replace("_", " "): v[key]
                for k, v in kinds.items() if v[key]}
        _strip(ax, data, "ms (log scale)")
        ax.set_yscale("log")
        values = [v for vs in data.values() for v in vs]
        ax.set_yticks([t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000)
                       if min(values) / 1.5 <= t <= max(values) * 1.5])
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.set_title(f"CSI {title} latency")
    fig.tight_layout()
    return fig


def _plot_attack(plt: Any, sc: dict[str, Any]) -> Any:
    attacks = sc["attack"]["attacks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, (name, a) in enumerate(attacks.items()):
        colour = f"C{i}"
        for cond, style in (("attacked", "-"), ("base", ":")):
            pts = a["rss"][cond]["samples"]
            if pts:
                ax1.plot([t for t, _ in pts], [r for _, r in pts], style, color=colour,
                         label=name if cond == "attacked" else None)
        for j, cond in enumerate(("base", "attacked")):
            vals = [s["ms"] for s in a["conditions"][cond]["samples"] if not s["errno"]]
            ax2.scatter([i * 3 + j] * len(vals), vals, s=12, color=colour,
                        marker="o" if cond == "attacked" else "x")
    ax1.set_xlabel("seconds (dotted: the unattacked instance)")
    ax1.set_ylabel("daemon RSS MiB")
    ax1.legend(fontsize=7)
    ax2.set_xticks([i * 3 + 0.5 for i in range(len(attacks))])
    ax2.set_xticklabels(list(attacks), rotation=20, fontsize=7)
    ax2.set_ylabel("legitimate first access ms (x: unattacked)")
    ax2.set_yscale("log")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    # Re-render a results file: python -m bench.report bench/results/results.json [OUT]
    import sys

    source = Path(sys.argv[1])
    for path in write(json.loads(source.read_text()), Path(sys.argv[2]) if len(sys.argv) > 2
                      else source.parent):
        print(path)

