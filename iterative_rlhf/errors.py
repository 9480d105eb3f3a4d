"""User-facing errors.

Every error a user can cause (bad file, bad recipe, bad flag) is raised as a
:class:`UserError` whose message is one line naming the place (file, row,
field) and what to do. The CLI prints it without a traceback and exits 2
(3 for :class:`AwaitingAnnotations`, a stop that is not a failure).
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; the message says the fix."""


class DataError(UserError):
    """Bad data in a file: the message names file, row and field."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.row, self.field = path, row, field


class ConfigError(UserError):
    """A recipe or --set override that does not fit the config schema."""


class NumericalError(UserError):
    """A NaN or inf in a loss or reward; the stage stops and keeps its last good checkpoint."""


class AwaitingAnnotations(UserError):
    """A campaign stops until people's comparisons of a round's pairs exist (``reward.refresh_data``).

    Not a failure: the CLI says what to annotate and where to write it, and exits 3, so that a script driving
    the loop can tell waiting from an error; rerunning the command goes on.
    """
