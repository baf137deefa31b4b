"""Errors a user can fix. Every stage raises a subclass of MedtuneError whose message is the
whole story (the offending key, file or name and what exists instead); the entry points print
it and exit with EXIT_USER_ERROR without knowing which stage raised it."""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class MedtuneError(Exception):
    """A problem in the user's recipe, data, artifacts or environment, explained in the message."""


def report(error: BaseException) -> int:
    """Print `error` as `medtune: error: ...` lines on stderr; return EXIT_USER_ERROR."""
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"medtune: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR
