"""The issue's targets, evaluated on a results dict: each one met, not met, or not measured.

Targets are reported, never asserted: a "not met" is a finding, not a harness failure.
"""

from __future__ import annotations

from typing import Any

# Measured with the real cvmfs2 2.12 client on a small repository (2 cores, kernel 6.18); quoted
# from the issue for comparison, not measured here.
REFERENCE = {
    "cvmfs2_boot_warm_cache_ms": 41,
    "autofs_first_access_overhead_ms": "3-4",
    "autofs_warm_stat_ratio": 1.09,
    "autofs_16_simultaneous_first_accesses": "one mount, all succeed",
    "automount_rss_mb": 6,
    "cvmfs2_rss_mb": 28,
}

MiB = 1024  # the footprint is recorded in KiB
AUTOFS_REFERENCE_MS = 3.0  # the low end of the "3-4 ms"
RESTART_ADDED_P99_MS = 10.0


def _get(d: Any, *keys: str | int) -> Any:
    for key in keys:
        in_dict = isinstance(d, dict) and key in d
        in_list = isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d)
        if in_dict or in_list:
            d = d[key]
        else:
            return None
    return d


def _x(r: dict[str, Any]) -> str:
    """A ratio: median [min-max]."""
    return f"{r['median']:.3f}x [{r['min']:.3f}-{r['max']:.3f}]"


def _control(r: dict[str, Any] | None) -> str:
    if not r or r.get("median") is None:
        return ""
    return f"; A/A control (a second direct mount) {_x(r)}"


def _row(tid: str, target: str, met: bool | None, figure: str) -> dict[str, Any]:
    return {"id": tid, "target": target, "met": met, "figure": figure}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    sc = results.get("scenarios", {})
    rows: list[dict[str, Any]] = []

    def ok(name: str) -> bool:
        return _get(sc, name, "status") == "ok"

    # Targets against autofs say why they were not measured where autofs could not run.
    autofs_skipped = _get(results, "systems", "unavailable", "autofs")
    unmeasured = f"not measured: autofs skipped ({autofs_skipped})" if autofs_skipped else (
        "not measured")

    # --- cold first access ---------------------------------------------------------------------
    cold = sc.get("cold", {})
    ours = _get(cold, "systems", "cvmfsd", "overhead_ms")
    theirs = _get(cold, "systems", "autofs", "overhead_ms")
    ours_lit = _get(cold, "systems", "cvmfsd", "overhead_literal_ms")
    theirs_lit = _get(cold, "systems", "autofs", "overhead_literal_ms")
    boot = _get(cold, "backend_boot_ms", "median")
    if ok("cold") and ours is not None and theirs is not None:
        rows.append(_row("cold_vs_autofs", "cold-access overhead of cvmfsd below autofs's",
                         ours < theirs,
                         f"cvmfsd {ours:+.2f} ms vs autofs {theirs:+.2f} ms per access "
                         f"(literal, medians: {ours_lit:+.1f} vs {theirs_lit:+.1f} ms; "
                         f"boot {boot:.0f} ms)"))
    elif ok("cold") and ours is not None:
        # No autofs here (e.g. a kernel built without it): the issue's own figure for autofs
        # with the real client stands in for it, 3-4 ms: below its low end.
        rows.append(_row("cold_vs_autofs", "cold-access overhead of cvmfsd below autofs's "
                         f"(the issue's reference, {REFERENCE['autofs_first_access_overhead_ms']}"
                         " ms: autofs cannot run here)", ours < AUTOFS_REFERENCE_MS,
                         f"cvmfsd {ours:+.2f} ms per access (literal, medians: {ours_lit:+.1f} ms)"
                         f" vs {AUTOFS_REFERENCE_MS:g} ms; {unmeasured}"))
    else:
        rows.append(_row("cold_vs_autofs", "cold-access overhead of cvmfsd below autofs's", None,
                         unmeasured))
    if ok("cold") and ours is not None:
        rows.append(_row("cold_1ms", "cold-access overhead of cvmfsd <= 1 ms over the boot",
                         ours <= 1.0,
                         f"{ours:+.2f} ms per access (literal, medians: {ours_lit:+.1f} ms)"))
    else:
        rows.append(_row("cold_1ms", "cold-access overhead of cvmfsd <= 1 ms over the boot", None,
                         "not measured"))

    # --- warm metadata ---------------------------------------------------------------------------
    for key, what in (("stat", "10,000 stats"), ("find", "find")):
        ours = _get(sc, "metadata", "systems", "cvmfsd", f"{key}_ratio")
        theirs = _get(sc, "metadata", "systems", "autofs", f"{key}_ratio")
        head = _get(sc, "metadata", "systems", "cvmfsd", f"{key}_vs_autofs")
        control = _get(sc, "metadata", "systems", "direct2", f"{key}_ratio")
        text = f"warm metadata ({what}) through cvmfsd no worse than autofs's ratio to direct"
        if ok("metadata") and ours and theirs and head and head["median"]:
            rows.append(_row(f"meta_{key}", text, head["median"] <= 1.0,
                             f"cvmfsd {_x(ours)} vs autofs {_x(theirs)} of direct; head to head, "
                             f"cvmfsd / autofs {_x(head)}" + _control(control)))
        else:
            rows.append(_row(f"meta_{key}", text, None, unmeasured))

    # --- warm reads ------------------------------------------------------------------------------
    for kind, what in (("seq_large", "sequential, large file"), ("rand_large", "random 4 KiB"),
                       ("small_files", "small files")):
        ratio = _get(sc, "reads", "systems", "cvmfsd", kind, "ratio")
        autofs = _get(sc, "reads", "systems", "autofs", kind, "ratio")
        control = _get(sc, "reads", "systems", "direct2", kind, "ratio")
        text = f"warm reads ({what}) through cvmfsd within 2% of direct"
        if ok("reads") and ratio and ratio["median"]:
            rows.append(_row(f"reads_{kind}", text, abs(ratio["median"] - 1) <= 0.02,
                             _x(ratio) + (f" (autofs {_x(autofs)})" if autofs else "")
                             + _control(control)))
        else:
            rows.append(_row(f"reads_{kind}", text, None, "not measured"))

    # --- storm -----------------------------------------------------------------------------------
    storm = _get(sc, "storm", "systems", "cvmfsd")
    params = _get(sc, "storm", "params") or {}
    r, p = params.get("repos"), params.get("procs")
    if ok("storm") and storm:
        boots = storm["boots_per_rep"]
        rows.append(_row("storm_boots", f"storm {p} x {r}: exactly R boots",
                         all(b == r for b in boots) and storm["max_boots_per_repo"] == 1,
                         f"boots per repetition {boots} (R = {r}); per repository "
                         f"{storm['min_boots_per_repo']}-{storm['max_boots_per_repo']}"))
        rows.append(_row("storm_errors", f"storm {p} x {r}: 0 errors", storm["errors"] == 0,
                         f"{storm['errors']} errors in {storm['accesses']} accesses"))
        p99 = storm["latency_ms"]["p99"]
        parallel = _get(sc, "storm", "systems", "direct", "latency_ms", "p99")
        autofs = _get(sc, "storm", "systems", "autofs", "latency_ms", "p99")
        extra = []
        if parallel is not None:
            extra.append(f"direct, {r} boots at once: p99 {parallel:.0f} ms")
        if autofs is not None:
            extra.append(f"autofs p99 {autofs:.0f} ms")
        # Dropped (issue 15): R boots at once cost the backend itself far more than one boot
        # on 2 cores, whoever starts them; the backend-relative bound below is the target.
        rows.append(_row("storm_p99", f"(dropped) storm {p} x {r}: p99 <= boot time + 100 ms",
                         None,
                         f"dropped: {r} boots at once on {results['machine']['nproc']} cores "
                         "take the backend itself far longer than one boot; p99 "
                         f"{p99:.0f} ms vs {_f(boot, '.0f')} + 100 ms"
                         + (f" ({'; '.join(extra)})" if extra else "")))
        if parallel is not None:
            rows.append(_row("storm_p99_parallel",
                             f"storm {p} x {r}: p99 <= the backend's own p99 for {r} "
                             "boots at once + 100 ms", p99 <= parallel + 100,
                             f"p99 {p99:.0f} ms vs {parallel:.0f} + 100 ms"))
    else:
        for tid in ("storm_boots", "storm_errors", "storm_p99"):
            rows.append(_row(tid, f"storm ({tid.split('_')[1]})", None, "not measured"))

    # --- footprint -------------------------------------------------------------------------------
    fp = _get(sc, "footprint", "systems", "cvmfsd")
    if ok("footprint") and fp:
        idle = fp["idle_rss_kib"] / MiB
        automount = _get(sc, "footprint", "systems", "autofs", "idle_rss_kib")
        rows.append(_row("rss_idle", "daemon RSS <= 30 MB idle", idle <= 30,
                         f"{idle:.1f} MiB RSS (USS {fp['idle_uss_kib'] / MiB:.1f} MiB), "
                         f"CPU {fp['idle_cpu_percent']:.2f}% idle"
                         + (f"; automount {automount / MiB:.1f} MiB" if automount else "")))
        per = fp["rss_kib_per_repo"]
        rows.append(_row("rss_per_repo", "<= 100 KB more per mounted repository",
                         per is not None and per <= 100,
                         f"{per:.1f} KiB per repository (RSS slope over "
                         f"{[pt['repos'] for pt in fp['points']]} repositories)"
                         if per is not None else "needs two counts >= 1"))
    else:
        rows.append(_row("rss_idle", "daemon RSS <= 30 MB idle", None, "not measured"))
        rows.append(_row("rss_per_repo", "<= 100 KB more per mounted repository", None,
                         "not measured"))

    # --- restart stall -----------------------------------------------------------------------
    paths = _get(sc, "restart", "paths")
    if ok("restart") and paths:
        for path, res in paths.items():
            added = res["added_p99_ms"]
            rows.append(_row(
                f"restart_{path}", f"restart ({path}): stall added at p99 <= 10 ms over the "
                "readers' own baseline", added is not None and added <= RESTART_ADDED_P99_MS
                and res["failures_restart"] == 0,
                f"{added:+.2f} ms (p99 {res['restart']['p99']:.2f} in restart windows vs "
                f"{res['baseline']['p99']:.2f} ms in their baselines; worst operation per "
                f"restart {res['added_worst_ms']['median']:+.1f} ms over its baseline's, "
                f"median; {res['failures_restart']} failed operations)"))
    else:
        rows.append(_row("restart", "restart: stall added at p99 <= 10 ms", None,
                         "not measured"))
    rows += _attack_rows(sc)
    return rows


# The daemon's memory under an attack: flat once the attack's state is established (what it may
# hold is bounded by configuration: max_names, the shares), within this much of where it began.
ATTACK_RSS_GROWTH_MIB = 8.0      # over the second half of the attack
ATTACK_RSS_PEAK_MIB = 64.0       # peak above the start


def _attack_rows(sc: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    attacks = _get(sc, "attack", "attacks") or {}
    if _get(sc, "attack", "status") != "ok" or not attacks:
        return [_row("attack", "under attack: a legitimate first access within its boot time "
                     "+ 100 ms", None, "not measured")]
    seconds = _get(sc, "attack", "params", "seconds")
    for name, res in attacks.items():
        hit, base = res["conditions"]["attacked"], res["conditions"]["base"]
        over = hit["overhead_ms"]
        if over["median"] is None:
            rows.append(_row(f"attack_{name}", f"under attack ({name}): a legitimate first "
                             "access within its boot time + 100 ms", False,
                             f"no access succeeded (errors {hit['errors']}, errno "
                             f"{hit['errnos']})"))
        else:
            rows.append(_row(
                f"attack_{name}", f"under attack ({name}): a legitimate first access within "
                "its boot time + 100 ms", hit["errors"] == 0 and over["median"] <= 100,
                f"{over['median']:+.0f} ms over its boot (median; max {over['max']:+.0f}); first "
                f"access {hit['first_access_ms']['median']:.0f} ms vs "
                f"{base['first_access_ms']['median']:.0f} ms unattacked ({res['ratio']}x); "
                f"errors {hit['errors']}"))
        rss = res["rss"]["attacked"]
        if rss["start_mib"] is not None:
            growth, peak = rss["second_half_growth_mib"], rss["peak_mib"] - rss["start_mib"]
            rows.append(_row(
                f"attack_{name}_rss", f"under attack ({name}): daemon RSS bounded (peak <= "
                f"start + {ATTACK_RSS_PEAK_MIB:g} MiB, <= {ATTACK_RSS_GROWTH_MIB:g} MiB growth "
                "over the second half)",
                peak <= ATTACK_RSS_PEAK_MIB and (growth or 0) <= ATTACK_RSS_GROWTH_MIB,
                f"{rss['start_mib']:.1f} -> peak {rss['peak_mib']:.1f} -> end "
                f"{rss['end_mib']:.1f} MiB over {seconds:g} s at pressure + the accesses; "
                f"second half {growth:+.1f} MiB"))
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "?" if value is None else format(value, fmt)
