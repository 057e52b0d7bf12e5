class VsearchError(Exception):
    """A problem the user can fix (bad path, bad option, bad input).

    The CLI prints these as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (or its type, where it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
