"""Run the CSI plugin in a mount namespace of its own, as the node DaemonSet runs it.

    python tests/csi/csi_nsplugin.py KUBELET_DIR CVMFS_ROOT -- PLUGIN ARGS...

csi/deploy/node-daemonset.yaml gives the plugin container the kubelet directory with
`mountPropagation: Bidirectional` (the container runtime binds it rshared: a peer of the host's, so
mounts go both ways) and the cvmfsd root with `HostToContainer` (rslave: the host's mounts arrive,
nothing goes back). Here: unshare(CLONE_NEWNS) gives a copy of every mount in the same peer groups
as the host's; the copy of the root is made a recursive slave; the copy of the kubelet directory
stays a peer (checked). Then the plugin is exec'd, so its pid is this process's pid.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from csi import mounts

CLONE_NEWNS = 0x00020000


def main() -> None:
    kubelet_dir, cvmfs_root = sys.argv[1:3]
    assert sys.argv[3] == "--"
    argv = sys.argv[4:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare")
    mounts.mount(None, cvmfs_root, None, mounts.MS_REC | mounts.MS_SLAVE)  # HostToContainer
    table = mounts.MountTable.read()
    kubelet = table.top(kubelet_dir)
    root = table.top(cvmfs_root)
    assert kubelet is not None and kubelet.shared, f"kubelet dir not shared: {kubelet}"
    assert root is not None and root.slave and not root.shared, f"root not a slave: {root}"
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
