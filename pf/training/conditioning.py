"""Moved to :mod:`pf.conditioning` (one conditioning module); this name stays until every caller imports it there."""

from pf.conditioning import ClassConditioning, TextConditioning  # noqa: F401
