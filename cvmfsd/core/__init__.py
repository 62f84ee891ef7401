"""The mount core: the root's FUSE operations, the registry and lifecycle of repository
mounts, cvmfs2 backends, kernel calls, restart takeover and upkeep. Imports nothing from
cvmfsd.admin."""
