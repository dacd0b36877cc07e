"""The one exception type the data layer raises for problems with data files."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(RuntimeError):
    """One-line, user-facing data problem (missing/corrupt/truncated/mismatched file)."""
