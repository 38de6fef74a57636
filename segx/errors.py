"""User-facing errors: one line that names the file or key and says what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegxError(Exception):
    """An error caused by input or configuration, reported as one line without a traceback."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' did you mean 'x'?' for the closest valid choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(choices), n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


def look_up_option(name: str, choices: Iterable[str], what: str, where: str = "") -> str:
    """Return ``name`` if it is one of ``choices``, else raise with the closest choice named."""
    choices = list(choices)
    if name in choices:
        return name
    hint = f" (see {where})" if where else ""
    raise SegxError(
        f"unknown {what} '{name}';{suggest(name, choices) or ' choose one of ' + ', '.join(sorted(choices))}{hint}"
    )
