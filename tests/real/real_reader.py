"""A reader for the real-backend tests: stats README and reads (and checks) files of real
repositories in a loop, recording every failure. Writes <out>.progress (operations so far)
now and then, and <out> as JSON at the end.

    real_reader.py path ROOT STOPFILE OUT REPO...   (absolute paths below ROOT)
    real_reader.py cwd ROOT STOPFILE OUT REPO       (working directory inside the repository)
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from realrepo import big_content, revision_files

CHUNK = 1 << 20


def main() -> None:
    mode, root, stop, out = sys.argv[1:5]
    repos = sys.argv[5:]
    # The live repositories serve v2: README of v2, and the 10 MiB file (the same in both).
    readme = {r: revision_files(r, "v2")["README"].encode() for r in repos}
    big = {r: big_content(r) for r in repos}
    if mode == "cwd":
        os.chdir(os.path.join(root, repos[0], "sub", "deeper"))
    ops = failures = 0
    errors: list[str] = []
    i = 0
    progress_at = 0.0
    while not os.path.exists(stop):
        repo = repos[i % len(repos)]
        i += 1
        try:
            base = "../.." if mode == "cwd" else os.path.join(root, repo)
            os.stat(os.path.join(base, "sub", "hello.txt"))
            with open(os.path.join(base, "README"), "rb") as f:
                if f.read() != readme[repo]:
                    raise OSError(f"wrong README in {repo}")
            # One 1 MiB slice of the big file, a different one each time.
            offset = (i % 10) * CHUNK
            with open(os.path.join(base, "big.bin"), "rb") as f:
                f.seek(offset)
                if f.read(CHUNK) != big[repo][offset:offset + CHUNK]:
                    raise OSError(f"wrong big.bin slice at {offset} in {repo}")
        except OSError as exc:
            failures += 1
            if len(errors) < 20:
                errors.append(f"{time.monotonic():.3f} {repo}: {exc}")
        ops += 1
        now = time.monotonic()
        if now - progress_at > 0.2:
            progress_at = now
            with open(out + ".progress.tmp", "w") as f:
                f.write(str(ops))
            os.replace(out + ".progress.tmp", out + ".progress")
        time.sleep(0.002)
    with open(out, "w") as f:
        json.dump({"mode": mode, "ops": ops, "failures": failures, "errors": errors}, f)


if __name__ == "__main__":
    main()
