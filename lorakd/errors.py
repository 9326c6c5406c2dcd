"""The one exception type for bad input: the CLI prints it as one line and exits 2."""
import reprlib


class UserError(Exception):
    """A problem with the user's files, options or config, explained in one line."""


_BRIEF = reprlib.Repr()  # keywords only from Python 3.12
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value, limit=120) -> str:
    """A value's repr for a message, cut short: a huge or deeply nested value (a YAML alias bomb) is never
    formatted whole."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def first_line(e: BaseException, limit=160) -> str:
    """An exception's first line for a one-line message (its type when it says nothing)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
