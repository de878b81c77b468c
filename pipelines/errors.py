"""Errors raised by the data pipelines.

They subclass the built-in exception a caller would naturally catch (``ValueError``,
``FileNotFoundError``) so generic handlers keep working, while the CLI can turn each into a
one-line message and exit code 2 without a traceback.
"""

from __future__ import annotations


class BadInputError(ValueError):
    """A raw file has a malformed row. The message names the file and the 1-based line number."""

    def __init__(self, path, line: int | None, reason: str, text: str | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, line {line}" if line is not None else self.path
        shown = f": {text[:120]!r}" if text is not None else ""
        super().__init__(f"{where}: {reason}{shown} (use on_bad_lines='skip' / --on-bad-lines skip to skip such lines)")


class EmptyDatasetError(ValueError):
    """Nothing is left after a cleaning step; the message says which step emptied the data."""


class RawDataMissingError(FileNotFoundError):
    """The raw files of a dataset are not on disk and could not be downloaded."""
