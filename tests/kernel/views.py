#!/usr/bin/env python3
"""kexp: which kernel procedures make every kind of pod view heal (issue 13).  Measurement only.
Run as root:

    .venv/bin/python tests/kernel/views.py A [PROC...]    repository heal
                                                          (a b c c-noprivate d1 d2 d4 d5)
    .venv/bin/python tests/kernel/views.py B              expiry: EBUSY and the ns scan
    .venv/bin/python tests/kernel/views.py C [VARIANT..]  root takeover (C0 C1 C2 C3 C4)
    .venv/bin/python tests/kernel/views.py D              subPath below the repo root

Each run re-executes itself in `unshare -m --propagation private` on a tmpfs of its own at
/tmp/kexp.<pid>; FUSE servers and pod-like processes are its children, stopped by pid; the
namespace and every mount in it die with it.  Results go to stdout and
tests/kernel/results/<exp>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import (  # noqa: E402
    O_PATHDIR,
    K,
    Lab,
    Mountinfo,
    Readers,
    attach,
    clone,
    detach,
    move_path,
    read_label,
    set_prop_fd,
    try_,
)

RESULTS = HERE / "results"


def log(*a) -> None:
    print(*a, flush=True)


# ==================================================================================================
# A. Repository heal
# ==================================================================================================
#
# Every procedure gets the lab with the repository's current mount (dead) at R/repo and a label
# for the replacement; it brings the replacement up at a private staging path first, as the
# daemon does.  `st` carries state across rounds (the persistent anchor of d4).

def staged(lab: Lab, new: str, st: dict) -> str:
    """The replacement, already mounted and served at a private staging path."""
    return st.pop("staged", None) or lab.staged_repo(new)


def anchor_of_top(lab: Lab, name: str = "anchor") -> tuple[str, int]:
    """Peer anchor: a non-recursive clone of the (dead) mount at R/repo, attached at a private
    staging dir.  It is a peer of that mount, so every slave of its group stays reachable."""
    a = f"{lab.stg}/{name}"
    os.makedirs(a, exist_ok=True)
    fd = os.open(f"{lab.root}/repo", O_PATHDIR)
    try:
        mp = clone(fd)
    finally:
        os.close(fd)
    attach(mp, a)
    return a, mp


def feed_and_drop_anchor(lab: Lab, a: str, mp: int) -> None:
    """Clone the new mount at R/repo onto the anchor (propagates to the anchor's slaves), make the
    anchor private (so that nothing propagates back when it goes), detach the anchor's stack."""
    c = clone(f"{lab.root}/repo")
    attach(c, a)
    os.close(c)
    set_prop_fd(mp, K.MS_PRIVATE)
    detach(a)  # the clone (top)
    detach(a)  # the anchor itself
    os.close(mp)


def heal_a(lab: Lab, new: str, st: dict) -> None:
    """Current design: detach the dead mount, MS_MOVE the new one into place."""
    detach(f"{lab.root}/repo")
    s = staged(lab, new, st)
    K.move(s, f"{lab.root}/repo")


def heal_b(lab: Lab, new: str, st: dict) -> None:
    """Stack the new mount on the dead one (no detach)."""
    s = staged(lab, new, st)
    K.move(s, f"{lab.root}/repo")


def heal_c(lab: Lab, new: str, st: dict) -> None:
    """Peer anchor + detach + MS_MOVE + clone onto the anchor + anchor private + detach it."""
    a, mp = anchor_of_top(lab)
    detach(f"{lab.root}/repo")
    s = staged(lab, new, st)
    K.move(s, f"{lab.root}/repo")
    feed_and_drop_anchor(lab, a, mp)


def heal_c_noprivate(lab: Lab, new: str, st: dict) -> None:
    """Negative control for c: detach the anchor's stack without making the anchor private."""
    a, mp = anchor_of_top(lab)
    detach(f"{lab.root}/repo")
    s = staged(lab, new, st)
    K.move(s, f"{lab.root}/repo")
    c = clone(f"{lab.root}/repo")
    attach(c, a)
    os.close(c)
    detach(a)
    detach(a)
    os.close(mp)


def heal_d1(lab: Lab, new: str, st: dict) -> None:
    """MOVE_MOUNT_BENEATH the new mount under the dead one at R/repo, then detach the top."""
    s = staged(lab, new, st)
    move_path(s, f"{lab.root}/repo", beneath=True)
    detach(f"{lab.root}/repo")


def heal_d2(lab: Lab, new: str, st: dict) -> None:
    """d1 at R/repo (no uncovered window) + the peer anchor of c for the dead mount's slaves."""
    a, mp = anchor_of_top(lab)
    s = staged(lab, new, st)
    move_path(s, f"{lab.root}/repo", beneath=True)
    detach(f"{lab.root}/repo")
    feed_and_drop_anchor(lab, a, mp)


def heal_d4(lab: Lab, new: str, st: dict) -> None:
    """d1 at R/repo + a persistent anchor (clone of the first dead mount, kept): the first heal
    stacks a clone of the new mount on it; later heals put the next clone BENEATH the previous
    one and detach the previous one, so that the removal propagates to the anchor's slaves."""
    first = "anchor" not in st
    if first:
        st["anchor"] = anchor_of_top(lab, "anchor4")
    a, _mp = st["anchor"]
    s = staged(lab, new, st)
    move_path(s, f"{lab.root}/repo", beneath=True)
    detach(f"{lab.root}/repo")
    c = clone(f"{lab.root}/repo")
    try:
        if first:
            attach(c, a)
        else:
            attach(c, a, beneath=True)
            detach(a)
    finally:
        os.close(c)


def heal_d5(lab: Lab, new: str, st: dict) -> None:
    """d1 at R/repo + one persistent anchor per generation (d4 generalised to views made after a
    heal): each anchor is a clone of a dead generation with the live clone on it."""
    anchors: list[str] = st.setdefault("anchors", [])
    cur = Mountinfo().stack(f"{lab.root}/repo")[-1]["source"].removeprefix("kexp-")
    # 1. an anchor for the generation that just died (views rooted in it may exist)
    a_cur, _ = anchor_of_top(lab, f"anchor-{cur}")
    # 2. the host: new mount beneath the dead one, detach the dead one
    s = staged(lab, new, st)
    move_path(s, f"{lab.root}/repo", beneath=True)
    detach(f"{lab.root}/repo")
    # 3. older anchors: next clone beneath the previous clone, detach the previous clone: the
    #    removal propagates and takes the dead copy off every view rooted in that generation
    for a in anchors:
        c = clone(f"{lab.root}/repo")
        attach(c, a, beneath=True)
        os.close(c)
        detach(a)
    # 4. the new anchor: a clone stacked on it reaches the views rooted in the dead generation
    c = clone(f"{lab.root}/repo")
    attach(c, a_cur)
    os.close(c)
    anchors.append(a_cur)


HEALS = {"a": heal_a, "b": heal_b, "c": heal_c, "c-noprivate": heal_c_noprivate, "d1": heal_d1,
         "d2": heal_d2, "d4": heal_d4, "d5": heal_d5}


def a_world(lab: Lab) -> dict:
    """Root, repository M1, every kind of view and a pod copy of each, with a cwd and an open
    file inside each pod copy."""
    lab.make_root("R1")
    lab.mount_repo("M1")
    V = lab.plugin_bind(lab.root, "V")
    T = lab.plugin_bind(f"{lab.root}/repo", "T")
    Tr = lab.rootdir_bind("repo", "Tr")
    S = lab.subpath(f"{V}/repo", "S")
    S2 = lab.subpath(f"{V}/repo/subdir", "S2")
    w = {"lab": {"host": lab.root + "/repo", "V": V + "/repo", "T": T, "Tr": Tr, "S": S,
                 "S2": S2}, "pods": {}}
    for pname, src, rel in (("PV", V, "repo"), ("P", T, ""), ("PTr", Tr, ""), ("PS", S, ""),
                            ("PS2", S2, "")):
        add_pod(lab, w, pname, src, rel)
    # mountPropagation None (the Kubernetes default): containerd makes the copy rprivate
    add_pod(lab, w, "PVp", V, "repo", "private")
    add_pod(lab, w, "Pp", T, "", "private")
    return w


def add_pod(lab: Lab, w: dict, pname: str, src: str, rel: str, mode: str = "slave") -> None:
    pod = lab.pod(pname, src, mode)
    top = f"{pod.path}/{rel}".rstrip("/")
    sub = top if pname == "PS2" or pname == "P2S2" else f"{top}/subdir"
    assert pod.do("chdir", path=sub)["ok"]
    assert pod.do("hold", path=f"{top}/file")["ok"]
    w["pods"][pname] = (pod, rel)


def observe(lab: Lab, w: dict) -> dict:
    out = {}
    for name, path in w["lab"].items():
        out[name] = {"read": read_label(f"{path}/file"), "stack": lab.stack(path)}
    for pname, (pod, rel) in w["pods"].items():
        o = {"read": pod.read(f"{rel}/file".lstrip("/")), "cwd": pod.r("readcwd", name="file"),
             "held": pod.r("readheld"), "stack": pod.stack(rel)}
        o["rewalk"] = pod.r("rewalk")
        o["cwd_after_rewalk"] = pod.r("readcwd", name="file")
        out[pname] = o
    out["_staging_mounts"] = len([r for r in Mountinfo().under(lab.stg) if r["mp"] != lab.stg])
    return out


def show(title: str, obs: dict) -> None:
    log(f"  {title}")
    for k, v in obs.items():
        if k.startswith("_"):
            log(f"    {k}: {v}")
            continue
        extra = ""
        if "cwd" in v:
            extra = (f" cwd={v['cwd']} held={v['held']} rewalk={v['rewalk']}"
                     f"->{v['cwd_after_rewalk']}")
        log(f"    {k:5s} read={v['read']:9s} layers={len(v['stack'])} {v['stack']}{extra}")


def exp_a(base: str, procs: list[str]) -> dict:
    results = {}
    for proc in procs:
        log(f"=== A/{proc}: {HEALS[proc].__doc__.strip().splitlines()[0]}")
        lab = Lab(base).setup()
        st: dict = {}
        res = {"rounds": []}
        try:
            w = a_world(lab)
            res["before"] = observe(lab, w)
            show("before", res["before"])
            cur = "M1"
            for rnd in (1, 2, 3):
                lab.kill(cur)
                new = f"M{rnd + 1}"
                st["staged"] = lab.staged_repo(new)
                t0 = time.monotonic()
                err = try_(HEALS[proc], lab, new, st)
                dt = (time.monotonic() - t0) * 1000
                obs = observe(lab, w)
                obs["_heal"] = err
                obs["_heal_ms"] = round(dt, 2)
                res["rounds"].append(obs)
                show(f"round {rnd}: killed {cur}, heal with {new}: {err} ({dt:.2f} ms of "
                     "mount syscalls)", obs)
                cur = new
                if rnd == 1:
                    # a per-repository volume and a subPath made after the first heal
                    T2 = lab.plugin_bind(f"{lab.root}/repo", "T2")
                    w["lab"]["T2"] = T2
                    add_pod(lab, w, "P2", T2, "")
        finally:
            lab.teardown()
        results[proc] = res
    return results


# ==================================================================================================
# B. Expiry: EBUSY, and a scan of every mount namespace
# ==================================================================================================

def root_groups(root: str) -> set[str]:
    """Peer group ids ("shared:N") of the daemon's root mount(s) at `root` in this namespace."""
    out = set()
    for r in Mountinfo().stack(root):
        for o in r["opt"].split():
            if o.startswith("shared:"):
                out.add(o.split(":")[1])
    return out


def scan_users(dev: str, groups: set[str], root_fstype: str = "fuse.cvmfsd",
               exclude_prefix: str | None = None) -> dict:
    """Every mount of device `dev` (maj:min), in any mount namespace, that umount2's EBUSY check
    does not cover: all of them except (1) copies whose parent is a copy of the daemon's root in
    its propagation tree (parent fstype fuse.cvmfsd and shared:G or master:G, G a peer group of
    the root): umount2 sees those; (2) copies under a dead root layer that is overmounted at its
    own root (old roots left in views by a takeover): unreachable by path; (3) the daemon's own
    staging/anchor mounts.  One readlink-free stat per process, one mountinfo read per unique
    namespace (deduplicated by the namespace inode)."""
    seen: set[int] = set()
    users = []
    npids = 0
    needle = f" {dev} ".encode()
    gtags = {f"shared:{g}".encode() for g in groups} | {f"master:{g}".encode() for g in groups}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        npids += 1
        try:
            ino = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except OSError:
            continue
        if ino in seen:
            continue
        seen.add(ino)
        try:
            with open(f"/proc/{pid}/mountinfo", "rb") as f:
                text = f.read()
        except OSError:
            continue
        if needle not in text:
            continue
        rows = {}
        hits = []
        for line in text.split(b"\n"):
            if not line:
                continue
            left, _, right = line.partition(b" - ")
            f = left.split(b" ")
            row = (f[1], f[4], f[3], right.split(b" ", 1)[0], set(f[6:]))
            rows[f[0]] = row
            if f[2] == dev.encode():
                hits.append(row)
        covered_roots = {(r[0], r[1]) for r in rows.values()}  # (parent id, mountpoint)
        for parent, mp, root, _fs, _opt in hits:
            prow = rows.get(parent)
            if prow is not None and prow[3] == root_fstype.encode():
                if prow[4] & gtags:
                    continue  # (1)
                if (parent, prow[1]) in covered_roots:
                    continue  # (2) the parent is overmounted at its root: a dead layer
            if exclude_prefix and mp.decode().startswith(exclude_prefix):
                continue  # (3)
            users.append({"ns": ino, "pid": int(pid), "mountpoint": mp.decode(),
                          "root": root.decode()})
    return {"users": users, "namespaces": len(seen), "pids": npids}


def dev_of(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def exp_b(base: str) -> dict:
    res: dict = {"ebusy": {}, "scan": {}}
    cases = [
        ("no other view", None),
        ("whole-root view V, pod cwd in PV/repo", "V"),
        ("per-repo T (open_tree), pod cwd in P", "T"),
        ("per-repo T (open_tree), pod holds P/file open", "Tfile"),
        ("per-repo T (open_tree), pod exists, idle", "Tidle"),
        ("root-dir Tr, pod cwd in PTr", "Tr"),
        ("whole-root V, rprivate pod (propagation None), cwd in it", "Vpriv"),
        ("subPath S of V/repo, pod cwd in PS", "S"),
        ("subPath S2 of V/repo/subdir, pod cwd in PS2", "S2"),
    ]
    for title, kind in cases:
        lab = Lab(base).setup()
        try:
            lab.make_root("R1")
            lab.mount_repo("M1")
            dev = dev_of(f"{lab.root}/repo")
            pod = None
            if kind in ("V", "Vpriv", "S", "S2"):
                V = lab.plugin_bind(lab.root, "V")
                if kind in ("V", "Vpriv"):
                    pod = lab.pod("PV", V, "private" if kind == "Vpriv" else "slave")
                    assert pod.do("chdir", path=f"{pod.path}/repo")["ok"]
                else:
                    src = f"{V}/repo" + ("/subdir" if kind == "S2" else "")
                    S = lab.subpath(src, kind)
                    pod = lab.pod("P" + kind, S)
                    pod.do("chdir", path=pod.path)
            elif kind in ("T", "Tfile", "Tidle"):
                T = lab.plugin_bind(f"{lab.root}/repo", "T")
                pod = lab.pod("P", T)
                if kind == "T":
                    pod.do("chdir", path=pod.path)
                elif kind == "Tfile":
                    pod.do("hold", path=f"{pod.path}/file")
            elif kind == "Tr":
                Tr = lab.rootdir_bind("repo", "Tr")
                pod = lab.pod("PTr", Tr)
                pod.do("chdir", path=pod.path)
            t0 = time.perf_counter()
            scan = scan_users(dev, root_groups(lab.root), exclude_prefix=lab.stg)
            scan_ms = (time.perf_counter() - t0) * 1000
            busy = try_(K.umount, f"{lab.root}/repo", 0)
            after = {}
            if pod is not None:
                after["pod_read_after_umount"] = pod.r("readcwd", name="file") \
                    if kind not in ("Tfile", "Tidle") else pod.read("file")
                lab.kill("M1")
                after["pod_read_after_backend_stop"] = pod.r("readcwd", name="file") \
                    if kind not in ("Tfile", "Tidle") else (pod.r("readheld") if kind == "Tfile"
                                                            else pod.read("file"))
            users = [(u["mountpoint"].replace(base, "BASE"), u["root"]) for u in scan["users"]]
            res["ebusy"][title] = {"umount2": busy, "scan_users": users,
                                   "scan_ms": round(scan_ms, 2), **after}
            log(f"  {title:48s} umount2(R/repo,0)={busy:6s} scan={users} "
                f"({scan_ms:.1f} ms) {after}")
        finally:
            lab.teardown()

    # cost of the scan with many extra mount namespaces
    lab = Lab(base).setup()
    try:
        lab.make_root("R1")
        lab.mount_repo("M1")
        T = lab.plugin_bind(f"{lab.root}/repo", "T")
        dev = dev_of(f"{lab.root}/repo")
        sleepers: list[subprocess.Popen] = []
        for extra in (0, 1, 50, 200, "200+100mounts"):
            if extra == "200+100mounts":
                # 100 more mounts in every namespace (they propagate into the sleepers' copies
                # of the shared BASE): a node with pods has far more than the lab's 29
                os.mkdir(f"{lab.base}/dummy")
                for i in range(100):
                    os.mkdir(f"{lab.base}/dummy/{i}")
                    K.mount("kexp-dummy", f"{lab.base}/dummy/{i}", "tmpfs", 0, "size=4k")
                extra_n = 200
            else:
                extra_n = extra
            while len(sleepers) < extra_n:
                p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sleep", "600"])
                sleepers.append(p)
                lab.extra.append(p)
            # wait until every sleeper is in its own namespace (unshare has exec'd sleep)
            my_ns = os.stat("/proc/self/ns/mnt").st_ino
            for p in sleepers:
                for _ in range(500):
                    try:
                        if os.stat(f"/proc/{p.pid}/ns/mnt").st_ino != my_ns and \
                                os.readlink(f"/proc/{p.pid}/exe").endswith("sleep"):
                            break
                    except OSError:
                        pass
                    time.sleep(0.01)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                scan = scan_users(dev, root_groups(lab.root), exclude_prefix=lab.stg)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            # the kernel's share: reading every unique namespace's mountinfo, no parsing
            t0 = time.perf_counter()
            seen = set()
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        ino = os.stat(f"/proc/{pid}/ns/mnt").st_ino
                        if ino not in seen:
                            seen.add(ino)
                            with open(f"/proc/{pid}/mountinfo", "rb") as f:
                                f.read()
                    except OSError:
                        pass
            read_only_ms = (time.perf_counter() - t0) * 1000
            with open("/proc/self/mountinfo") as mi:
                mi_lines = sum(1 for _ in mi)
            res["scan"][extra] = {"median_ms": round(times[len(times) // 2], 2),
                                  "max_ms": round(times[-1], 2), "namespaces": scan["namespaces"],
                                  "pids": scan["pids"], "users_found": len(scan["users"]),
                                  "mounts_per_ns": mi_lines,
                                  "read_only_ms": round(read_only_ms, 2)}
            log(f"  scan with {extra!s:>3} extra namespaces: {res['scan'][extra]}")
    finally:
        lab.teardown()
    return res


# ==================================================================================================
# C. Root takeover
# ==================================================================================================

def c_world(lab: Lab, anchor: bool) -> dict:
    if anchor:
        # /cvmfs is a bind of ANCHOR/r (a shared tmpfs); the FUSE root goes on top of it.
        a = f"{lab.base}/anchor"
        os.mkdir(a)
        K.mount("kexp-anchor", a, "tmpfs", 0, "size=1m,mode=755")
        os.mkdir(f"{a}/r")
        K.set_propagation(a, K.MS_SHARED)
        K.mount(f"{a}/r", lab.root, None, K.MS_BIND)
        lab.anchor = a
    lab.make_root("R1")
    lab.mount_repo("M1")
    V = anchor_whole_bind(lab, "V") if anchor else lab.plugin_bind(lab.root, "V")
    T = lab.plugin_bind(f"{lab.root}/repo", "T")
    w = {"V": V, "T": T, "PV": lab.pod("PV", V), "P": lab.pod("P", T)}
    return w


def anchor_whole_bind(lab: Lab, name: str) -> str:
    """Whole-root volume rooted at the anchor's directory r (never dead), with a copy of the
    current root tree on top; slave of the anchor's group, so it receives later roots too."""
    tgt = lab.target(name)
    a = clone(lab.anchor)  # the anchor alone: r is uncovered in the clone
    d = K.open_tree(a, "r", K.OPEN_TREE_CLONE | K.OPEN_TREE_CLOEXEC)
    os.close(a)
    try:
        attach(d, tgt)
        set_prop_fd(d, K.MS_SLAVE)
        t = clone(lab.root, recursive=True)
        attach(t, tgt)
        os.close(t)
        set_prop_fd(d, K.MS_SLAVE, recursive=True)
    finally:
        os.close(d)
    return tgt


def stage_new_root(lab: Lab, label: str) -> tuple[int, str]:
    """Takeover steps 1-4: fd of the old root, new root at staging with clones of the live
    repository mounts attached below it."""
    rootfd = os.open(lab.root, O_PATHDIR)
    mi = Mountinfo()
    top = mi.stack(lab.root)[-1]
    names = [r["mp"].rsplit("/", 1)[1] for r in mi.rows if r["parent"] == top["id"]]
    st = f"{lab.stg}/.root-{label}"
    os.mkdir(st)
    lab.fuse(st, label, "root")
    for n in names:
        fd = os.open(f"{lab.root}/{n}", O_PATHDIR)
        c = clone(fd)
        os.close(fd)
        attach(c, f"{st}/{n}")
        os.close(c)
    return rootfd, st


def old_repo_fds(lab: Lab) -> list[int]:
    mi = Mountinfo()
    top = mi.stack(lab.root)[-1]
    return [os.open(r["mp"], O_PATHDIR) for r in mi.rows if r["parent"] == top["id"]]


def takeover(lab: Lab, variant: str, label: str) -> dict:
    steps = {}
    t0 = time.perf_counter()
    oldfds = old_repo_fds(lab)
    rootfd, st = stage_new_root(lab, label)
    steps["staged_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    t1 = time.perf_counter()
    if variant == "C4":
        # per-generation root anchors (A/d5 applied to the root): views keep [dead root they were
        # made from, live root], the host keeps one layer
        anchors: list[str] = lab.__dict__.setdefault("root_anchors", [])
        old = lab.root_label
        newfd = os.open(st, O_PATHDIR)
        a_cur = f"{lab.stg}/ranchor-{old}"
        os.mkdir(a_cur)
        c = clone(lab.root)  # 1. the (dead) old root alone: a peer of its group
        attach(c, a_cur)
        os.close(c)
        # 1b. the host's old root private: it must not receive what lands on its anchor (it is
        #     a peer of it), and its removal in 5. must not propagate
        set_prop_fd(rootfd, K.MS_PRIVATE)
        move_path(st, lab.root, beneath=True)  # 2. new root beneath the old one at /cvmfs
        # 3. the old root (now the top) with its repository mounts, on the host only (private).
        #    Before any clone of the new root: a recursive clone would include it (it sits on
        #    the new root's root after 2.)
        detach(lab.root)
        for a in anchors:  # 4. older generations: new tree beneath, previous tree detached
            c = clone(newfd, recursive=True)
            attach(c, a, beneath=True)
            os.close(c)
            detach(a)
        c = clone(newfd, recursive=True)  # 5. views made from the old root get the new tree
        attach(c, a_cur)
        os.close(c)
        anchors.append(a_cur)
        os.close(newfd)
    elif variant == "C3":
        # anchor design: the new root beneath the old one, then detach the old one (and its
        # repository mounts) everywhere through propagation
        move_path(st, lab.root, beneath=True)
        detach(lab.root)
    else:
        K.move(st, lab.root)  # stacks on R_old; propagates into every view
        if variant == "C0":
            for fd in oldfds:
                K.umount(f"/proc/self/fd/{fd}", K.MNT_DETACH, follow=True)
        elif variant in ("C1", "C2"):
            set_prop_fd(rootfd, K.MS_PRIVATE)  # old root private: nothing below propagates now
            park = f"{lab.stg}/.park"
            os.makedirs(park, exist_ok=True)
            K.move(lab.root, park)  # the new root (parent now private) parked
            if variant == "C1":
                move_path(park, lab.root, beneath=True)
                detach(lab.root)  # the old root (top) with its old repository mounts
            else:
                detach(lab.root)  # the old root: /cvmfs is uncovered until the move
                K.move(park, lab.root)
    steps["swap_ms"] = round((time.perf_counter() - t1) * 1000, 2)
    try_(K.set_propagation, lab.root, K.MS_SHARED)
    for fd in [*oldfds, rootfd]:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(st)
    lab.root_label = label
    return steps


def exp_c(base: str, variants: list[str]) -> dict:
    results = {}
    for variant in variants:
        log(f"=== C/{variant}")
        lab = Lab(base).setup()
        res = {"restarts": []}
        try:
            w = c_world(lab, anchor=(variant == "C3"))
            V, T, PV, P = w["V"], w["T"], w["PV"], w["P"]
            log(f"  before: host {lab.stack(lab.root)} V {lab.stack(V)} PV {PV.stack()}")
            cur = "R1"
            for rnd in (1, 2, 3):
                new = f"R{rnd + 1}"
                rd = Readers({"host": f"{lab.root}/repo/file", "V": f"{V}/repo/file",
                              "T": f"{T}/file"})
                PV.do("reader_start", paths=[f"{PV.path}/repo/file"])
                P.do("reader_start", paths=[f"{P.path}/file"])
                time.sleep(0.2)
                lab.kill(cur)  # the daemon is SIGKILLed; its root is dead from here on
                time.sleep(0.2)
                steps_box: dict = {}
                # try_ calls it at once: the defaults only pin this iteration's values.
                steps = try_(lambda lab=lab, variant=variant, new=new, box=steps_box:
                             box.update(takeover(lab, variant, new)))
                time.sleep(0.2)
                reads = rd.finish()
                reads["PV"] = {k: v for k, v in PV.do("reader_stop").items() if k != "ok"}
                reads["P"] = {k: v for k, v in P.do("reader_stop").items() if k != "ok"}
                reads["_failed_total"] = sum(sum(v["fail"].values()) for k, v in reads.items()
                                             if not k.startswith("_"))
                cur = new
                # a repository mounted after the restart must reach views made before it
                later = f"repo{rnd + 1}"
                lab.mount_repo(f"N{rnd}", name=later)
                v2 = {}
                if "V2" in w:
                    v2 = {"V2_read": read_label(f"{w['V2']}/repo/file"),
                          "V2_stack": lab.stack(w["V2"]), "PV2_read": w["PV2"].read("repo/file"),
                          "PV2_stack": w["PV2"].stack(),
                          "later_PV2": w["PV2"].read(f"{later}/file")}
                o = {
                    "takeover": steps, **steps_box,
                    "reads_during": reads,
                    "host_stack": lab.stack(lab.root), "V_stack": lab.stack(V),
                    "PV_stack": PV.stack(), "T_stack": lab.stack(T), "P_stack": P.stack(),
                    "host_read": read_label(f"{lab.root}/repo/file"),
                    "V_read": read_label(f"{V}/repo/file"), "PV_read": PV.read("repo/file"),
                    "T_read": read_label(f"{T}/file"), "P_read": P.read("file"),
                    "later_repo": later,
                    "later_host": read_label(f"{lab.root}/{later}/file"),
                    "later_V": read_label(f"{V}/{later}/file"),
                    "later_PV": PV.read(f"{later}/file"),
                    "rootfile_V": read_label(f"{V}/rootfile"),
                    "staging_left": [r["mp"].replace(base, "BASE") for r in
                                     Mountinfo().under(lab.stg) if r["mp"] != lab.stg],
                    **v2,
                }
                res["restarts"].append(o)
                log(f"  restart {rnd}: {cur} took over: {steps} {steps_box}")
                log(f"    reads during swap: {reads}")
                for k in ("host", "V", "PV", "T", "P"):
                    log(f"    {k:4s} read={o[k + '_read']:8s} stack={o[k + '_stack']}")
                if v2:
                    log(f"    V2   read={o['V2_read']:8s} stack={o['V2_stack']}  (made after "
                        f"restart 1)\n    PV2  read={o['PV2_read']:8s} stack={o['PV2_stack']}")
                log(f"    later {later}: host={o['later_host']} V={o['later_V']} "
                    f"PV={o['later_PV']}" + (f" PV2={o['later_PV2']}" if v2 else "") +
                    f"; V/rootfile={o['rootfile_V']}; staging mounts left "
                    f"{len(o['staging_left'])}")
                if rnd == 1:
                    # a whole-root volume and its pod made after the first restart
                    w["V2"] = (anchor_whole_bind(lab, "V2") if variant == "C3"
                               else lab.plugin_bind(lab.root, "V2"))
                    w["PV2"] = lab.pod("PV2", w["V2"])
            # a repository heal after the restarts still reaches the per-repo volume
            lab.kill("M1")
            err = try_(heal_c, lab, "M9", {})
            res["heal_after"] = {"heal": err, "host": read_label(f"{lab.root}/repo/file"),
                                 "V": read_label(f"{V}/repo/file"), "PV": PV.read("repo/file"),
                                 "PV2": w["PV2"].read("repo/file"),
                                 "T": read_label(f"{T}/file"), "P": P.read("file")}
            log(f"  repo heal (c) after the restarts: {res['heal_after']}")
        finally:
            lab.teardown()
        results[variant] = res
    return results


# ==================================================================================================
# D. subPath below the repository root
# ==================================================================================================

def exp_d(base: str) -> dict:
    res = {}
    for variant, timeout, wait in (("anchor-subdir, fresh dentries", 1e6, 0),
                                   ("anchor-subdir, expired dentries", 1.0, 2.5),
                                   ("overmount the host-side subPath target", 1e6, 0),
                                   ("overmount the per-repo target T", 1e6, 0)):
        log(f"=== D/{variant}")
        lab = Lab(base).setup()
        try:
            lab.make_root("R1")
            lab.mount_repo("M1", timeout=timeout)
            V = lab.plugin_bind(lab.root, "V")
            T = lab.plugin_bind(f"{lab.root}/repo", "T")
            S2 = lab.subpath(f"{V}/repo/subdir", "S2")
            PS2 = lab.pod("PS2", S2)
            P = lab.pod("P", T)
            time.sleep(wait)
            lab.kill("M1")
            steps = {}
            if variant.startswith("anchor-subdir"):
                a, mp = anchor_of_top(lab)
                detach(f"{lab.root}/repo")
                s = lab.staged_repo("M2")
                K.move(s, f"{lab.root}/repo")
                # a bind of the new mount's subdir onto the anchor's subdir dentry (a walk into
                # the dead filesystem: only its cached dentries can answer)
                sub = clone(f"{lab.root}/repo/subdir")
                steps["attach_subdir"] = try_(attach, sub, f"{a}/subdir")
                os.close(sub)
                c = clone(f"{lab.root}/repo")
                steps["attach_root"] = try_(attach, c, a)
                os.close(c)
                set_prop_fd(mp, K.MS_PRIVATE)
                while try_(detach, a) == "ok":
                    pass
                os.close(mp)
            elif variant.startswith("overmount the host-side"):
                heal_c(lab, "M2", {})
                sub = clone(f"{lab.root}/repo/subdir")
                steps["attach"] = try_(attach, sub, S2)
                os.close(sub)
            else:
                heal_a(lab, "M2", {})
                c = clone(f"{lab.root}/repo")
                steps["attach_T"] = try_(attach, c, T)
                os.close(c)
                steps["T_read"] = read_label(f"{T}/file")
                steps["P_read_slave_only_T"] = P.read("file")
                # the same with T made shared (it keeps its master): pods made after this
                # are slaves of T's own group
                K.set_propagation(T, K.MS_SHARED)
                P2 = lab.pod("P2", T)
                lab.kill("M2")
                heal_a(lab, "M3", {})
                c = clone(f"{lab.root}/repo")
                steps["attach_T_shared"] = try_(attach, c, T)
                os.close(c)
                steps["P2_read_shared_T"] = P2.read("file")
                steps["P2_stack"] = P2.stack()
            o = {"steps": steps, "S2": read_label(f"{S2}/file"), "PS2": PS2.read("file"),
                 "S2_stack": lab.stack(S2), "PS2_stack": PS2.stack(),
                 "T": read_label(f"{T}/file"), "P": P.read("file"), "T_stack": lab.stack(T),
                 "P_stack": P.stack(), "host": read_label(f"{lab.root}/repo/file"),
                 "V": read_label(f"{V}/repo/file")}
            res[variant] = o
            log(f"  {json.dumps(o)}")
        finally:
            lab.teardown()
    return res


# ==================================================================================================

def inner(argv: list[str]) -> None:
    base = os.environ["KEXP_BASE"]
    exp = argv[0]
    RESULTS.mkdir(exist_ok=True)
    log(f"kernel {os.uname().release}")
    if exp == "A":
        out = exp_a(base, argv[1:] or list(HEALS))
    elif exp == "B":
        out = exp_b(base)
    elif exp == "C":
        out = exp_c(base, argv[1:] or ["C0", "C1", "C2", "C3", "C4"])
    elif exp == "D":
        out = exp_d(base)
    else:
        raise SystemExit(f"unknown experiment {exp}")
    name = exp + ("-" + "-".join(argv[1:]) if argv[1:] else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")


def main() -> None:
    if os.environ.get("KEXP_BASE"):
        inner(sys.argv[1:])
        return
    base = f"/tmp/kexp.{os.getpid()}"
    os.mkdir(base)
    try:
        rc = subprocess.call(["unshare", "-m", "--propagation", "private", sys.executable,
                              __file__, *sys.argv[1:]], env={**os.environ, "KEXP_BASE": base})
    finally:
        os.rmdir(base)
    with open("/proc/self/mountinfo") as mi:
        leaked = [line for line in mi if "kexp" in line]
    print(f"host mounts left by kexp: {len(leaked)}", flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
