class VsearchError(Exception):
    """A problem the user can fix (bad path, bad option, bad input).

    The CLI prints these as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """


class TooLargeForMemory(VsearchError):
    """An index larger than this machine's memory: the one such error a benchmark skips an index for."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (or its type, where it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """A file that could not be written or read, in one line: why, and which file where known."""
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")


def counted(count: int, noun: str) -> str:
    """`count` `noun`s for a message: "1 shard", "2,048 vectors"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def human_size(size: float) -> str:
    """Bytes for a message: "1.50 GiB", "45.2 MiB", "3.0 KiB", "940 B"."""
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.1f} KiB" if size >= 2**10 else f"{size:.0f} B"
