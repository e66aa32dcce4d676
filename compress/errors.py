"""The one exception type of the project.

Every error a user can cause (a bad path, an unsupported option, a corrupt checkpoint, data that is too
short) is raised as :class:`CompressError` with one sentence that says what was wrong and what to do.
The CLI prints that sentence and exits with code 2; library users catch it like any exception.
"""

from __future__ import annotations


class CompressError(Exception):
    """A problem with the user's input or environment, described in one sentence."""

    exit_code = 2
