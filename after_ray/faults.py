"""Failpoints: named places where a test can kill the process, to prove that resume is exact.

``failpoint("finetune_epoch")`` does nothing unless the environment variable
``AFTER_RAY_FAILPOINT`` names that point; then the process kills itself with SIGKILL (no
cleanup, no atexit, exactly like a machine that loses power). The crash tests set it in a
subprocess. A point can carry a count, ``AFTER_RAY_FAILPOINT=state_write@3``: die the third time
the point is reached in this process.

Two more variables make the points usable across processes:

- ``AFTER_RAY_FAILPOINT_ONCE=/path/marker``: fire only if the marker file does not exist yet,
  and create it just before dying. A Ray Train worker or a scoring actor restarted after the
  kill then runs through the same point (this is how "a worker dies once" is simulated).
- ``AFTER_RAY_FAILPOINT_TRACE=/path/trace``: append the name of every point reached, one per
  line, whether or not it fires. The crash harness records an uninterrupted run's trace and
  draws its kill points from it.

Ray workers and actors do not inherit the driver's environment: ``snapshot()`` returns the
variables to ship in a worker's config (not the trace), and ``install()`` sets them there.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV = "AFTER_RAY_FAILPOINT"
ONCE_ENV = "AFTER_RAY_FAILPOINT_ONCE"
TRACE_ENV = "AFTER_RAY_FAILPOINT_TRACE"
_hits: dict[str, int] = {}


def failpoint(name: str, before_kill: Callable[[], object] | None = None) -> None:
    """Die here if the environment names this point; ``before_kill`` runs just before (e.g. to
    leave half a write behind, as a power cut mid-write would)."""
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < int(count or 1):
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            # O_EXCL: of several workers reaching the point together, exactly one dies.
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if before_kill is not None:
        before_kill()
    os.kill(os.getpid(), signal.SIGKILL)


def snapshot() -> dict[str, str]:
    """The failpoint variables to ship to workers (empty in normal runs).

    Never the trace file: a trace is one process's ordered path (the crash harness draws the
    driver's kill points from it and counts hits per process); workers' lines would interleave
    with it in no fixed order and name points whose kill does not stop the driver.
    """
    return {key: os.environ[key] for key in (ENV, ONCE_ENV) if os.environ.get(key)}


def install(variables: dict[str, str] | None) -> None:
    """Set the variables from ``snapshot()`` in a worker or actor process."""
    if variables:
        os.environ.update(variables)
