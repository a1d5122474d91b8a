"""Moved to :mod:`pf.cli` (one parser for every entry point); this name stays until every caller imports ``pf.cli``."""

from pf.cli import UsageError, parse, run  # noqa: F401
