"""cvmfsd.lazy: deferred modules load on first use, in whatever order, without a hang."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Each runs in a fresh interpreter, where `import cvmfsd` defers asyncio, ssl, hmac and hashlib.
CASES = {
    # asyncio's own import uses ssl (asyncio.sslproto): one deferred module loading another.
    "asyncio first": "import asyncio; print(asyncio.get_event_loop_policy().__class__.__name__)",
    "ssl first": "import ssl; print(ssl.OPENSSL_VERSION.split()[0])",
    # What pytest does to format a failing test's traceback: inspect walks sys.modules.
    "inspect walks every module": "import inspect, os\n"
                                  "print(inspect.getmodule(os.path.join.__code__))",
    "hashlib": "import hashlib; print(hashlib.sha1(b'x').hexdigest()[:4])",
}
EXPECTED = {"asyncio first": "_UnixDefaultEventLoopPolicy", "ssl first": "OpenSSL",
            "inspect walks every module": "None", "hashlib": "11f6"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deferred_module_loads_on_first_use(case: str) -> None:
    code = "import sys, cvmfsd\n" \
           "assert type(sys.modules['asyncio']).__name__ == '_Deferred'\n" + CASES[case]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, EXPECTED[case]), out.stderr
