"""User-facing errors.

Every mistake a user can make (bad name, missing file, corrupt diff, wrong base model) raises
`DiffpruneError` with one line that says what is wrong and how to fix it. The CLI prints that line and
exits non-zero; tracebacks are reserved for bugs.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class DiffpruneError(Exception):
    """A user error: the message is shown as-is, without a traceback."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> DiffpruneError:
    """Build an 'unknown X' error with a "did you mean" hint from `known`."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return DiffpruneError(f"unknown {kind} '{name}'{hint} (known: {', '.join(known)})")
