"""User-facing errors: raised for bad paths, bad config and unreachable services.

The CLI prints ``error: <message>`` on one line and exits non-zero for these; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OctomedError(Exception):
    """An error whose message is meant for the user, printed as one line."""


class ConfigError(OctomedError):
    """A configuration value is missing or invalid."""


class StorageError(OctomedError):
    """A storage URI cannot be read or written (wrong path, unreachable endpoint, no credentials)."""


class SourceError(OctomedError):
    """An input file cannot be read as the named format at all (not a per-record problem)."""
