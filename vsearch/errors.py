class VsearchError(Exception):
    """A problem the user can fix (bad path, bad option, bad input).

    The CLI prints these as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (or its type, where it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def counted(count: int, noun: str) -> str:
    """`count` `noun`s for a message: "1 shard", "2,048 vectors"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
