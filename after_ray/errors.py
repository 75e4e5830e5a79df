"""Exceptions that carry a user-facing message: what went wrong, where, and how to fix it.

The CLI turns any ``AfterRayError`` into that message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator


class AfterRayError(Exception):
    """Base class for errors whose message is meant for the user as it is."""

    exit_code = 2


class ConfigError(AfterRayError):
    """The configuration (YAML file or a dotted override) is invalid."""


class CorpusError(AfterRayError):
    """A corpus directory, or a file in it that the loader needs, is missing or malformed."""


class LabelImportError(AfterRayError):
    """A label file returned by annotators failed validation; the run state was not changed."""


class RunStateError(AfterRayError):
    """The run directory is inconsistent, locked by another run, or cannot be written."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then every exception behind it, breadth first, each once.

    Behind an exception: its ``__cause__`` and ``__context__``, a Ray error's ``cause``, and the
    per-worker errors of a Ray Train failure (``worker_failures``). Libraries wrap the error a
    user can act on (torch re-raises a failed write as a RuntimeError whose context is the
    OSError; Ray Train wraps a worker's exception), so callers look for it along this chain.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop(0)
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        nested = [exc.__cause__, exc.__context__, getattr(exc, "cause", None)]
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict):
            nested.extend(failures.values())
        pending.extend(e for e in nested if isinstance(e, BaseException))
