"""User errors: each is one line naming what is wrong and where; the CLI prints it and exits
with code 2, without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a spec, a file, a column): one line, exit code 2."""


class DataError(UserError):
    """A data source or shard set cannot be used as given."""
