"""A stand-in for the CernVM-FS client `cvmfs2` (README.md beside this file): the
demo's backend, the tests' and the benchmark's. Imports nothing from cvmfsd."""
