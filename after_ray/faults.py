"""Failpoints: named places where a test can kill the process, to prove that resume is exact.

``failpoint("finetune:1")`` does nothing unless the environment variable ``AFTER_RAY_FAILPOINT``
names that point; then the process kills itself with SIGKILL (no cleanup, no atexit, exactly
like a machine that loses power). The crash tests set it in a subprocess. A point can carry a
count, ``AFTER_RAY_FAILPOINT=state_write@3``: die at the third time the point is reached.
"""

from __future__ import annotations

import os
import signal

ENV = "AFTER_RAY_FAILPOINT"
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
