"""CSI v1 protocol: the vendored csi.proto and the stubs generated from it (see generate.py)."""
