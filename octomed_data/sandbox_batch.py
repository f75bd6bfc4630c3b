"""Moved to :mod:`octomed_data.sandbox.batch` (kept for old imports until every importer moved)."""

from octomed_data.sandbox.batch import BatchConfig

__all__ = ["BatchConfig"]
