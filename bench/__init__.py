"""Benchmark harness: cvmfsd against a direct mount and against autofs on the same backend.

Entry point: ``python -m bench.run [--quick] [--only SCENARIO ...] [--out DIR]`` (see README.md).
"""
