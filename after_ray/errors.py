"""Exceptions that carry a user-facing message: what went wrong, where, and how to fix it.

The CLI turns any ``AfterRayError`` into that message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


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
